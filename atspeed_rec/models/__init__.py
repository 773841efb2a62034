"""This project's RecBole models, by the name `--model=` takes."""

from atspeed_rec.models.genrec import GenRec

MODELS: dict[str, type] = {"GenRec": GenRec}
