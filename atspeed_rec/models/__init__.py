"""The language models, in plain torch: token layout (`vocab`), from-scratch Llamas (`lm`), the
pretrained LLM with LoRA (`pretrained`), the draft (`draft`), the lean decoding forward
(`fast_forward`) and its fused inference weights (`fused`), dtypes (`precision`) and training
windows (`sequences`).

The RecBole model classes built on them live in `atspeed_rec.recbole_glue`.
"""
