"""This project's RecBole models, by the name `--model=` takes."""

MODELS: dict[str, type] = {}
