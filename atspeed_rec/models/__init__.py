"""The models: token layout (`vocab`), LMs (`lm`), and the RecBole models (`genrec`, ...).

The registry of names `--model=` takes is `atspeed_rec.recbole_glue.registry.project_models`.
"""
