"""`fesmia-hooks audit` end to end: every model format (TorchScript, state_dict + factory,
Lightning checkpoint, Keras 3 file, Hugging Face folder) on every data form (.pt, .npy/.npz,
image folder, text), the exit status (0 not shown, 1 shown, 2 could not run), the JSON and
PNG outputs, one-line errors, and no data values in anything printed or written."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fesmia_hooks.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLANTED = 987.25  # an input value that must never appear in any output
PLANTED_WORD = "zqxjplanted"  # a word of a text document that must never appear
N_SUSPECTS, N_NON_MEMBERS, CLASSES = 30, 60, 3
FAST = ["--permutations", "999"]



def mlp(hidden=64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, hidden), nn.ReLU(), nn.Linear(hidden, 3))


MLP = inspect.getsource(mlp)  # the same `mlp` in the factory and Lightning files
FACTORY = f"""\
import torch
from torch import nn

NOT_CALLABLE = 3

{MLP}

def build():
    return mlp()


def build_narrow():
    return mlp(hidden=32)


def build_broken():
    raise RuntimeError("the model needs a config")
"""
LIGHTNING = f"""\
import lightning.pytorch as pl
import torch
from torch import nn

{MLP}

class Classifier(pl.LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 0.01):
        super().__init__()
        self.save_hyperparameters()
        self.net = mlp(hidden)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_index):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
"""


# ------------------------------------------------------------------------------------ data
def pictures(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random 4x4 RGB pictures (uint8, HWC) and random labels in [0, 3)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8),
            rng.integers(0, CLASSES, n).astype(np.int64))


def as_inputs(images: np.ndarray) -> torch.Tensor:
    """What an image folder reads: float CHW in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0).contiguous()


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    from PIL import Image

    for name in ("a_cat", "b_dog", "c_eel"):  # every class folder, even an empty one
        (root / name).mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image).save(root / ("a_cat", "b_dog", "c_eel")[label] / f"{index:03d}.png")
    return root


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    """Pictures, their files in each form, and models that did or did not see the suspects."""
    root = tmp_path_factory.mktemp("vision")
    s_img, s_lab = pictures(N_SUSPECTS, seed=1)
    n_img, n_lab = pictures(N_NON_MEMBERS, seed=2)
    o_img, o_lab = pictures(N_SUSPECTS, seed=3)  # what the model that never saw them saw
    s_x, n_x, o_x = as_inputs(s_img), as_inputs(n_img), as_inputs(o_img)
    s_y, n_y, o_y = (torch.from_numpy(v) for v in (s_lab, n_lab, o_lab))
    files = {
        "suspects.pt": (s_x, s_y), "non_members.pt": {"inputs": n_x, "labels": n_y},
        "members.pt": (o_x, o_y),
    }
    for name, value in files.items():
        torch.save(value, root / name)
    np.savez(root / "suspects.npz", inputs=s_x.numpy(), labels=s_lab)
    np.savez(root / "non_members.npz", inputs=n_x.numpy(), labels=n_lab.astype(np.int32))
    planted = s_x.clone()
    planted[4, 1, 2, 3] = PLANTED
    torch.save((planted, s_y), root / "planted.pt")
    np.savez(root / "planted_non_members.npz", inputs=n_x.numpy().copy(), labels=n_lab)
    with np.load(root / "planted_non_members.npz") as f:
        arrays = dict(f)
    arrays["inputs"][7, 0, 0, 0] = PLANTED
    np.savez(root / "planted_non_members.npz", **arrays)
    try:
        write_folder(root / "suspects_img", s_img, s_lab)
        write_folder(root / "non_members_img", n_img, n_lab)
        images = True
    except ImportError:
        images = False
    seen = train(mlp(), s_x, s_y)
    unseen = train(mlp(), o_x, o_y)
    torch.jit.script(seen).save(str(root / "seen.pt"))
    torch.jit.script(unseen).save(str(root / "unseen.pt"))
    torch.save(seen.state_dict(), root / "seen_weights.pt")
    torch.save(unseen.state_dict(), root / "unseen_weights.pt")
    (root / "factory.py").write_text(FACTORY)
    return {"root": root, "images": images, "suspects": (s_x, s_y), "seen": seen,
            "others": (o_x, o_y)}


def run_cli(capsys, *args) -> tuple[int, str, str]:
    status = main(["audit", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def assert_clean(*texts: str) -> None:
    for text in texts:
        assert "987.2" not in text and PLANTED_WORD not in text and "Traceback" not in text


# ------------------------------------------------------------------------- the formats
def test_torchscript_on_pt_files_exit_1_when_seen_0_when_not(vision, capsys):
    root = vision["root"]
    status, out, err = run_cli(capsys, "--model", root / "seen.pt", "--suspects",
                               root / "suspects.pt", "--non-members", root / "non_members.pt",
                               *FAST)
    assert status == 1, out + err
    assert "seen.pt (torchscript)" in out and "verdict      shown" in out
    assert "suspects.pt (pt): 30 samples" in out and "non_members.pt (pt): 60 samples" in out
    assert "top 10 of 30 suspects" in out
    status, out, err = run_cli(capsys, "--model", root / "unseen.pt", "--suspects",
                               root / "suspects.npz", "--non-members",
                               root / "non_members.npz", *FAST)
    assert status == 0, out + err
    assert "verdict      not shown" in out and "not proof of absence" in out


def test_state_dict_with_a_file_factory_on_image_folders(vision, capsys):
    root = vision["root"]
    if not vision["images"]:
        pytest.skip("Pillow is not installed")
    factory = f"{root / 'factory.py'}:build"
    status, out, err = run_cli(capsys, "--model", root / "seen_weights.pt", "--factory", factory,
                               "--suspects", root / "suspects_img", "--non-members",
                               root / "non_members_img", *FAST)
    assert status == 1, out + err
    assert "(state_dict)" in out and "suspects_img (images): 30 samples" in out
    status, out, err = run_cli(capsys, "--model", root / "unseen_weights.pt", "--factory",
                               factory, "--suspects", root / "suspects_img", "--non-members",
                               root / "non_members_img", *FAST)
    assert status == 0, out + err


def test_state_dict_with_a_factory_importable_from_the_current_folder(vision, capsys,
                                                                      monkeypatch):
    monkeypatch.chdir(vision["root"])  # `factory` is importable from here, as with python
    monkeypatch.delitem(sys.modules, "factory", raising=False)
    status, out, err = run_cli(capsys, "--model", "seen_weights.pt", "--factory", "factory:build",
                               "--suspects", "suspects.pt", "--non-members", "non_members.npz",
                               *FAST)
    assert status == 1, out + err
    assert "seen_weights.pt (state_dict)" in out
    assert "factory" in sys.modules and os.getcwd() not in sys.path[:1]
    monkeypatch.delitem(sys.modules, "factory", raising=False)


def test_known_members_give_few_shot_scores_and_log_mia(vision, capsys, tmp_path):
    root = vision["root"]
    s_x, s_y = vision["suspects"]
    torch.save((s_x[:20], s_y[:20]), tmp_path / "suspects.pt")
    torch.save((s_x[20:], s_y[20:]), tmp_path / "members.pt")  # 10 known members
    status, out, err = run_cli(capsys, "--model", root / "seen.pt", "--suspects",
                               tmp_path / "suspects.pt", "--non-members", root / "non_members.pt",
                               "--members", tmp_path / "members.pt", "--top", "3",
                               "--json", tmp_path / "a.json", *FAST)
    assert status == 1, out + err
    assert "members.pt (pt): 10 samples" in out and "few-shot log-odds" in out
    assert json.loads((tmp_path / "a.json").read_text())["members"] == 10


def test_lightning_checkpoint_saved_by_a_trainer(vision, capsys, tmp_path):
    pytest.importorskip("lightning")
    import lightning.pytorch as pl

    from fesmia_hooks.audit_cli import resolve

    root = vision["root"]
    (tmp_path / "lit.py").write_text(LIGHTNING)
    classifier = resolve(f"{tmp_path / 'lit.py'}:Classifier", "--lightning-module")
    s_x, s_y = vision["suspects"]
    module = classifier(hidden=64, lr=0.01)
    trainer = pl.Trainer(max_steps=300, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, accelerator="cpu")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(s_x, s_y),
                                         batch_size=N_SUSPECTS)
    trainer.fit(module, loader)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    status, out, err = run_cli(capsys, "--model", tmp_path / "model.ckpt", "--lightning-module",
                               f"{tmp_path / 'lit.py'}:Classifier", "--suspects",
                               root / "suspects.npz", "--non-members", root / "non_members.pt",
                               *FAST)
    assert status == 1, out + err
    assert "model.ckpt (lightning)" in out
    status, out, err = run_cli(capsys, "--model", tmp_path / "model.ckpt", "--suspects",
                               root / "suspects.pt", "--non-members", root / "non_members.pt")
    assert status == 2 and "needs --lightning-module" in err


def test_keras_file_with_a_softmax_output(vision, capsys, tmp_path):
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("Keras is not on the torch backend")
    root = vision["root"]
    s_x, s_y = vision["suspects"]

    def model():
        keras.utils.set_random_seed(0)
        built = keras.Sequential([
            keras.Input((3, 4, 4)), keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"), keras.layers.Dense(3, activation="softmax"),
        ])
        built.compile(optimizer=keras.optimizers.Adam(0.01),
                      loss="sparse_categorical_crossentropy")
        return built

    seen = model()
    seen.fit(s_x.numpy(), s_y.numpy(), epochs=300, batch_size=N_SUSPECTS, verbose=0)
    seen.save(tmp_path / "seen.keras")
    model().save(tmp_path / "untrained.keras")
    status, out, err = run_cli(capsys, "--model", tmp_path / "seen.keras", "--suspects",
                               root / "suspects.npz", "--non-members", root / "non_members.npz",
                               *FAST)
    assert status == 1, out + err
    assert "(keras; softmax output read as log-probabilities)" in out
    status, out, err = run_cli(capsys, "--model", tmp_path / "untrained.keras", "--suspects",
                               root / "suspects.npz", "--non-members", root / "non_members.npz",
                               *FAST)
    assert status == 0, out + err


# ------------------------------------------------------------------------ language models
WORDS = [f"w{i}" for i in range(50)]
VOCAB = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
ENCODE = f"""\
VOCAB = {VOCAB!r}


def encode(line):
    return [VOCAB.get(word, 0) for word in line.split()]


def not_a_list(line):
    return len(line)
"""


@pytest.fixture(scope="module")
def language(tmp_path_factory):
    """A tiny GPT-2 trained on the suspect sentences, one never trained, in HF folders."""
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("language")
    rng = np.random.default_rng(0)
    ids = rng.integers(2, len(VOCAB), (60, 8))
    ids = ids[np.unique(ids, axis=0, return_index=True)[1]]
    suspects, non_members = ids[:20], ids[20:60]

    def text(rows, planted=False):
        lines = [" ".join(WORDS[i - 2] for i in row) for row in rows]
        if planted:
            lines[3] = f"{lines[3]} {PLANTED_WORD}"
        return "\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n"  # a blank line

    (root / "suspects.txt").write_text(text(suspects))
    (root / "non_members.txt").write_text(text(non_members, planted=True))
    np.save(root / "suspects.npy", suspects)
    torch.save({"input_ids": torch.from_numpy(non_members),
                "attention_mask": torch.ones(40, 8, dtype=torch.long)}, root / "non_members.pt")
    (root / "encode.py").write_text(ENCODE)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    untrained = GPT2LMHeadModel(config)
    torch.manual_seed(0)
    trained = GPT2LMHeadModel(config)
    batch = torch.from_numpy(suspects)
    optimizer = torch.optim.Adam(trained.parameters(), lr=0.01)
    for _ in range(120):
        optimizer.zero_grad()
        trained(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=VOCAB, unk_token="[UNK]"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]",
                                        pad_token="[PAD]")
    trained.save_pretrained(root / "trained")
    tokenizer.save_pretrained(root / "trained")
    trained.save_pretrained(root / "trained_no_tokenizer")
    untrained.save_pretrained(root / "untrained")
    tokenizer.save_pretrained(root / "untrained")
    return root


def test_hugging_face_causal_lm_on_text_with_its_tokenizer(language, capsys, tmp_path):
    status, out, err = run_cli(capsys, "--model", language / "trained", "--suspects",
                               language / "suspects.txt", "--non-members",
                               language / "non_members.txt", "--json", tmp_path / "lm.json",
                               *FAST)
    assert status == 1, out + err
    assert "(huggingface; AutoModelForCausalLM, GPT2LMHeadModel)" in out
    assert "suspects.txt (text; the model folder's tokenizer): 20 samples" in out
    assert "   line" in out  # text suspects are listed with their line numbers
    document = json.loads((tmp_path / "lm.json").read_text())
    assert document["model"]["format"] == "huggingface"
    assert sorted(document["suspect_lines"]) == [*range(1, 11), *range(12, 22)]  # blank: 11
    assert_clean(out, err, (tmp_path / "lm.json").read_text())


def test_hugging_face_untrained_on_npy_and_pt_token_ids_exits_0(language, capsys):
    status, out, err = run_cli(capsys, "--model", language / "untrained", "--suspects",
                               language / "suspects.npy", "--non-members",
                               language / "non_members.pt", *FAST)
    assert status == 0, out + err
    assert "suspects.npy (npy): 20 samples" in out


def test_text_through_encode_or_as_bytes(language, capsys):
    folder = language / "trained_no_tokenizer"
    status, out, err = run_cli(capsys, "--model", folder, "--suspects", language / "suspects.txt",
                               "--non-members", language / "non_members.txt", "--encode",
                               f"{language / 'encode.py'}:encode", *FAST)
    assert status == 1, out + err
    assert f"--encode {language / 'encode.py'}:encode" in out
    status, out, err = run_cli(capsys, "--model", folder, "--suspects", language / "suspects.txt",
                               "--non-members", language / "non_members.txt", *FAST)
    assert status in (0, 1) and "(text; UTF-8 bytes)" in out, out + err
    status, out, err = run_cli(capsys, "--model", folder, "--suspects", language / "suspects.txt",
                               "--non-members", language / "non_members.txt", "--encode",
                               f"{language / 'encode.py'}:not_a_list")
    assert status == 2 and "must turn a line into a list of int token ids, got int" in err
    assert_clean(out, err)


def test_hugging_face_sequence_classifier_and_a_folder_without_its_head(language, capsys,
                                                                         tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=60, n_positions=16,
                        num_labels=3, pad_token_id=1, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "classifier")
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(2, 60, (90, 8), generator=g), torch.randint(0, 3, (90,), generator=g)
    torch.save((ids[:30], labels[:30]), tmp_path / "s.pt")
    np.savez(tmp_path / "n.npz", inputs=ids[30:].numpy(), labels=labels[30:].numpy())
    status, out, err = run_cli(capsys, "--model", tmp_path / "classifier", "--suspects",
                               tmp_path / "s.pt", "--non-members", tmp_path / "n.npz", *FAST)
    assert status == 0, out + err
    assert "AutoModelForSequenceClassification, GPT2ForSequenceClassification" in out
    status, _, err = run_cli(capsys, "--model", tmp_path / "classifier", "--suspects",
                             language / "suspects.txt", "--non-members", tmp_path / "n.npz")
    assert status == 2 and "but the model is a sequence classifier" in err
    # a causal LM's folder whose config names no architecture would get a random head
    (tmp_path / "headless").mkdir()
    for file in (language / "untrained").iterdir():
        (tmp_path / "headless" / file.name).write_bytes(file.read_bytes())
    config_file = tmp_path / "headless" / "config.json"
    config_json = json.loads(config_file.read_text())
    del config_json["architectures"]
    config_file.write_text(json.dumps(config_json))
    status, _, err = run_cli(capsys, "--model", tmp_path / "headless", "--suspects",
                             tmp_path / "s.pt", "--non-members", tmp_path / "n.npz")
    assert status == 2
    assert ("1 weight(s) of AutoModelForSequenceClassification are not in the folder (e.g. "
            "'score.weight'; config architectures none), so they would be random") in err


def test_a_language_model_refuses_labelled_samples(language, vision, capsys):
    status, _, err = run_cli(capsys, "--model", language / "trained", "--suspects",
                             vision["root"] / "suspects.pt", "--non-members",
                             vision["root"] / "non_members.pt")
    assert status == 2
    assert "holds (inputs, labels) samples, but the model is a causal language model" in err


# ---------------------------------------------------------------------- outputs, privacy
def test_json_and_png_are_written_and_hold_no_input_value(vision, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    root = vision["root"]
    status, out, err = run_cli(capsys, "--model", root / "seen.pt", "--suspects",
                               root / "planted.pt", "--non-members",
                               root / "planted_non_members.npz", "--json",
                               tmp_path / "out" / "audit.json", "--plot",
                               tmp_path / "out" / "audit.png", "--top", "30", *FAST)
    assert status == 1, out + err
    text = (tmp_path / "out" / "audit.json").read_text()
    document = json.loads(text)
    assert document["verdict"] == "shown" and document["model"] == {
        "path": str(root / "seen.pt"), "format": "torchscript"}
    assert document["inputs"]["suspects"] == {"path": str(root / "planted.pt"), "format": "pt",
                                              "samples": 30}
    assert document["inputs"]["members"] is None
    assert len(document["suspect_scores"]) == 30 and len(document["non_member_scores"]) == 60
    assert sorted(document["ranking"]) == list(range(30))
    png = (tmp_path / "out" / "audit.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    assert matplotlib.image.imread(tmp_path / "out" / "audit.png").shape[:2] == (400, 1000)
    assert f"wrote {tmp_path / 'out' / 'audit.json'}" in out
    assert_clean(out, err, text)


def test_the_console_script_exits_1_in_a_subprocess(vision, tmp_path):
    root = vision["root"]
    script = Path(sys.executable).with_name("fesmia-hooks")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fesmia_hooks.cli"]
    done = subprocess.run(
        [*command, "audit", "--model", str(root / "seen.pt"), "--suspects",
         str(root / "suspects.pt"), "--non-members", str(root / "non_members.npz"),
         "--permutations", "499", "--json", str(tmp_path / "ci.json")],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert json.loads((tmp_path / "ci.json").read_text())["verdict"] == "shown"
    done = subprocess.run([*command, "audit", "--model", str(tmp_path / "none.pt"),
                           "--suspects", "s.pt", "--non-members", "n.pt"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr == f"fesmia-hooks: error: --model {tmp_path / 'none.pt'}: no such file or folder\n"


# ------------------------------------------------------------------------------ bad input
def pickled_data(root: Path) -> Path:
    torch.save({"inputs": torch.zeros(3, 2), "labels": Fraction(1, 3)}, root / "pickled.pt")
    return root / "pickled.pt"


def truncated(root: Path, name: str) -> Path:
    data = (root / name).read_bytes()
    target = root / f"truncated_{name}"
    target.write_bytes(data[: len(data) // 2])
    return target


BAD = {
    "shapes-disagree": (lambda r: ["--model", r / "seen.pt", "--suspects", r / "suspects.pt",
                                   "--non-members", r / "flat.pt"],
                        "suspects and non-members must have the same sample shape, got "
                        "(3, 4, 4) and (48,)"),
    "factory-missing": (lambda r: ["--model", r / "seen_weights.pt", "--factory",
                                   "no_such_module_xyz:build", "--suspects", r / "suspects.pt",
                                   "--non-members", r / "non_members.pt"],
                        "--factory 'no_such_module_xyz:build' cannot be imported: no module "
                        "named 'no_such_module_xyz'"),
    "factory-no-attribute": (lambda r: ["--model", r / "seen_weights.pt", "--factory",
                                        f"{r / 'factory.py'}:make", "--suspects",
                                        r / "suspects.pt", "--non-members", r / "non_members.pt"],
                             "factory.py has no 'make'"),
    "factory-not-callable": (lambda r: ["--model", r / "seen_weights.pt", "--factory",
                                        f"{r / 'factory.py'}:NOT_CALLABLE", "--suspects",
                                        r / "suspects.pt", "--non-members", r / "non_members.pt"],
                             "must name a callable, got int"),
    "factory-raises": (lambda r: ["--model", r / "seen_weights.pt", "--factory",
                                  f"{r / 'factory.py'}:build_broken", "--suspects",
                                  r / "suspects.pt", "--non-members", r / "non_members.pt"],
                       "failed when called with no arguments: RuntimeError: the model needs a "
                       "config"),
    "state-dict-does-not-fit": (lambda r: ["--model", r / "seen_weights.pt", "--factory",
                                           f"{r / 'factory.py'}:build_narrow", "--suspects",
                                           r / "suspects.pt", "--non-members",
                                           r / "non_members.pt"],
                                "does not fit the model of --factory"),
    "state-dict-without-factory": (lambda r: ["--model", r / "seen_weights.pt", "--suspects",
                                              r / "suspects.pt", "--non-members",
                                              r / "non_members.pt"],
                                   "is not TorchScript (no code inside): for a state_dict give "
                                   "--factory"),
    "corrupt-model": (lambda r: ["--model", truncated(r, "seen_weights.pt"), "--factory",
                                 f"{r / 'factory.py'}:build", "--suspects", r / "suspects.pt",
                                 "--non-members", r / "non_members.pt"],
                      "is not a readable torch.save file (not the zip archive torch.save writes"),
    "corrupt-torchscript": (lambda r: ["--model", truncated(r, "seen.pt"), "--format",
                                       "torchscript", "--suspects", r / "suspects.pt",
                                       "--non-members", r / "non_members.pt"],
                            "is not a readable TorchScript file"),
    "corrupt-data": (lambda r: ["--model", r / "seen.pt", "--suspects",
                                truncated(r, "suspects.npz"), "--non-members",
                                r / "non_members.pt"],
                     "is not a readable numpy file"),
    "unknown-model-format": (lambda r: ["--model", r / "factory.py", "--suspects",
                                        r / "suspects.pt", "--non-members", r / "non_members.pt"],
                             "cannot tell the format of a .py file; give --format"),
    "unknown-data-format": (lambda r: ["--model", r / "seen.pt", "--suspects", r / "factory.py",
                                       "--non-members", r / "non_members.pt"],
                            "samples must be a .pt file"),
    "too-few-samples": (lambda r: ["--model", r / "seen.pt", "--suspects", r / "two.pt",
                                   "--non-members", r / "two_more.pt"],
                        "with 2 suspect(s) and 2 non-member(s) no test can reach p <= 0.05"),
    "sample-on-both-sides": (lambda r: ["--model", r / "seen.pt", "--suspects", r / "planted.pt",
                                        "--non-members", r / "overlap.pt"],
                             "5 sample(s) appear among both suspects and non-members"),
    "pickled-data": (lambda r: ["--model", r / "seen.pt", "--suspects", pickled_data(r),
                                "--non-members", r / "non_members.pt"],
                     "holds pickled Python objects (fractions.Fraction), which loading with "
                     "weights_only=True refuses"),
    "pickled-model": (lambda r: ["--model", r / "whole_model.pt", "--factory",
                                 f"{r / 'factory.py'}:build", "--suspects", r / "suspects.pt",
                                 "--non-members", r / "non_members.pt"],
                      "holds pickled Python objects (torch.nn.modules.container.Sequential)"),
    "no-labels": (lambda r: ["--model", r / "seen.pt", "--suspects", r / "inputs_only.pt",
                             "--non-members", r / "non_members.pt"],
                  "inputs without labels: a classifier's samples need labels"),
    "bad-plot-suffix": (lambda r: ["--model", r / "seen.pt", "--suspects", r / "suspects.pt",
                                   "--non-members", r / "non_members.pt", "--plot", r / "x.jpg"],
                        "--plot must end in .png, .pdf, .svg"),
}


@pytest.fixture(scope="module")
def broken(vision):
    root = vision["root"]
    s_x, s_y = vision["suspects"]
    planted = torch.load(root / "planted.pt")
    torch.save((s_x.flatten(1)[:40], s_y[:40]), root / "flat.pt")
    torch.save((s_x[:2], s_y[:2]), root / "two.pt")
    torch.save((s_x[2:4], s_y[2:4]), root / "two_more.pt")
    o_x, o_y = vision["others"]
    torch.save((torch.cat([planted[0][:5], o_x]), torch.cat([planted[1][:5], o_y])),
               root / "overlap.pt")
    torch.save(mlp(), root / "whole_model.pt")
    torch.save(s_x, root / "inputs_only.pt")
    return root


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_clear_line(broken, capsys, case):
    arguments, message = BAD[case]
    status, out, err = run_cli(capsys, *arguments(broken), *FAST)
    assert status == 2, out + err
    assert out == ""
    assert err.startswith("fesmia-hooks: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert_clean(out, err)


def test_folders_without_config_or_class_folders_and_mismatched_classes(vision, capsys, tmp_path):
    root = vision["root"]
    (tmp_path / "empty").mkdir()
    status, _, err = run_cli(capsys, "--model", tmp_path / "empty", "--suspects",
                             root / "suspects.pt", "--non-members", root / "non_members.pt")
    assert status == 2 and "is a folder without config.json" in err
    if not vision["images"]:
        pytest.skip("Pillow is not installed")
    status, _, err = run_cli(capsys, "--model", root / "seen.pt", "--suspects", tmp_path / "empty",
                             "--non-members", root / "non_members_img")
    assert status == 2 and "is a folder without class subfolders" in err
    (tmp_path / "two_classes" / "a_cat").mkdir(parents=True)
    (tmp_path / "two_classes" / "b_dog").mkdir()
    status, _, err = run_cli(capsys, "--model", root / "seen.pt", "--suspects",
                             root / "suspects_img", "--non-members", tmp_path / "two_classes")
    assert status == 2 and "every image folder needs the same class folders" in err


def test_help_names_every_format(capsys):
    with pytest.raises(SystemExit) as done:
        main(["audit", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for word in ("--factory", "--lightning-module", ".keras", "config.json", ".npz",
                 "DIR/<class>/*.png", ".txt", "exit status: 0 not shown, 1 shown, 2 could not run"):
        assert word in out, word
    assert textwrap.dedent(out) == out


# ------------------------------------------------------- outputs whole or not at all, exits
def console(*args: object) -> list[str]:
    script = Path(sys.executable).with_name("fesmia-hooks")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fesmia_hooks.cli"]
    return [*command, "audit", *map(str, args)]


def limited(bytes_: int):
    """A ``preexec_fn`` limiting the size of any file the command writes (as a full disk)."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (bytes_, bytes_))


def test_a_failed_write_leaves_no_partial_nor_emptied_file_and_prints_no_verdict(vision, capsys,
                                                                                 tmp_path):
    pytest.importorskip("matplotlib")
    root = vision["root"]
    sample = ["--model", root / "seen.pt", "--suspects", root / "suspects.pt", "--non-members",
              root / "non_members.pt", *FAST]
    status, _, _ = run_cli(capsys, *sample, "--json", tmp_path / "size.json", "--plot",
                           tmp_path / "size.png")
    assert status == 1
    json_size, png_size = ((tmp_path / f"size.{e}").stat().st_size for e in ("json", "png"))
    assert json_size < png_size
    (tmp_path / "audit.json").write_text("old\n")
    # the JSON cannot be written whole: the old file stays as it was
    done = subprocess.run(console(*sample, "--json", tmp_path / "audit.json"),
                          capture_output=True, text=True, timeout=120, check=False,
                          preexec_fn=limited(json_size // 2))
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    assert done.stderr == (f"fesmia-hooks: error: --json {tmp_path / 'audit.json'} cannot be "
                           "written (File too large); no output was written\n")
    assert (tmp_path / "audit.json").read_text() == "old\n"
    # the JSON fits, the picture does not: neither is written, nor its folder made
    done = subprocess.run(console(*sample, "--json", tmp_path / "audit.json", "--plot",
                                  tmp_path / "new" / "audit.png"),
                          capture_output=True, text=True, timeout=120, check=False,
                          preexec_fn=limited((json_size + png_size) // 2))
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and "--plot" in done.stderr and "File too large" in done.stderr
    assert (tmp_path / "audit.json").read_text() == "old\n"
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.json", "size.json", "size.png"]


def test_when_the_second_output_cannot_be_moved_in_the_first_is_removed(vision, capsys, tmp_path,
                                                                        monkeypatch):
    pytest.importorskip("matplotlib")
    root = vision["root"]
    replace = os.replace

    def failing(source, target):
        if str(target).endswith(".png"):
            raise OSError(28, "No space left on device")
        return replace(source, target)

    monkeypatch.setattr(os, "replace", failing)
    status, out, err = run_cli(capsys, "--model", root / "seen.pt", "--suspects",
                               root / "suspects.pt", "--non-members", root / "non_members.pt",
                               "--json", tmp_path / "a.json", "--plot", tmp_path / "a.png", *FAST)
    assert status == 2 and out == "", out + err
    assert err == (f"fesmia-hooks: error: --plot {tmp_path / 'a.png'} cannot be written (No "
                   "space left on device); no output was written\n")
    assert list(tmp_path.iterdir()) == []  # no JSON, no picture, no temporary file


def test_output_paths_are_refused_before_anything_is_loaded(vision, capsys, tmp_path):
    root = vision["root"]
    (tmp_path / "s.pt").write_bytes((root / "suspects.pt").read_bytes())
    (tmp_path / "a_file").write_text("x")
    base = ["--model", tmp_path / "no_such_model.pt", "--suspects", tmp_path / "s.pt",
            "--non-members", root / "non_members.pt"]  # a missing model: the paths come first
    cases = [
        (["--json", tmp_path / "s.pt"], f"--json {tmp_path / 's.pt'} is the --suspects input"),
        (["--json", tmp_path / ".." / tmp_path.name / "s.pt"], "is the --suspects input"),
        (["--json", tmp_path / "no_such_model.pt"], "is the --model input"),
        (["--json", tmp_path / "a.png", "--plot", tmp_path / "a.png"],
         "--json and --plot name the same file"),
        (["--json", tmp_path / "a_file" / "deeper" / "x.json"],
         f"{tmp_path / 'a_file'} is a file, not a folder"),
        (["--plot", tmp_path / "a_file" / "x.png"], "is a file, not a folder"),
        (["--json", os.devnull], "is not a regular file"),
        (["--json", tmp_path], "is a folder; give a file path"),
    ]
    if vision["images"]:
        cases.append((["--suspects", root / "suspects_img", "--json",
                       root / "suspects_img" / "a_cat" / "x.json"],
                      "lies inside the --suspects folder"))
    for extra, message in cases:
        status, out, err = run_cli(capsys, *base, *extra)
        assert status == 2 and out == "", (extra, out + err)
        assert err.startswith("fesmia-hooks: error: ") and err.count("\n") == 1, err
        assert message in err, (extra, err)
    assert (tmp_path / "s.pt").read_bytes() == (root / "suspects.pt").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "s.pt"]


def test_a_closed_stdout_still_writes_the_outputs_and_exits_with_the_verdict(vision, tmp_path):
    root = vision["root"]
    process = subprocess.Popen(
        console("--model", root / "seen.pt", "--suspects", root / "suspects.pt",
                "--non-members", root / "non_members.pt", *FAST, "--json", tmp_path / "a.json"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # as `| head -1` does, before anything is printed
    err = process.stderr.read()
    process.stderr.close()
    assert process.wait(timeout=120) == 1, err
    assert err == b""
    assert json.loads((tmp_path / "a.json").read_text())["verdict"] == "shown"


EXITING = f"""\
import sys

import torch
from torch import nn

{MLP}

class Exiting(nn.Sequential):
    def forward(self, x):
        sys.exit(0)


def exits():
    sys.exit(0)


def interrupted():
    raise KeyboardInterrupt


def exiting_forward():
    return Exiting(*mlp())


def exits_on_a_line(line):
    sys.exit(1)


def nothing(line):
    return []
"""


def guarded_main(capsys, *args) -> tuple[int, str, str]:
    """``run_cli`` that fails the test, rather than the session, on an escaping exit."""
    try:
        status = main(["audit", *map(str, args)])
    except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt included
        pytest.fail(f"{type(exc).__name__} escaped the command")
    out, err = capsys.readouterr()
    return status, out, err


def test_user_code_that_calls_sys_exit_or_is_interrupted_exits_2_with_one_line(vision, capsys,
                                                                              tmp_path):
    root = vision["root"]
    (tmp_path / "user.py").write_text(EXITING)
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(0)\n")
    data = ["--suspects", root / "suspects.pt", "--non-members", root / "non_members.pt", *FAST]
    weights = ["--model", root / "seen_weights.pt"]
    cases = [
        ([*weights, "--factory", f"{tmp_path / 'user.py'}:exits"],
         f"--factory '{tmp_path / 'user.py'}:exits' called sys.exit"),
        ([*weights, "--factory", f"{tmp_path / 'exits_on_import.py'}:build"],
         "exits_on_import.py called sys.exit"),
        ([*weights, "--factory", f"{tmp_path / 'user.py'}:interrupted"], "interrupted"),
        ([*weights, "--factory", f"{tmp_path / 'user.py'}:exiting_forward", "--json",
          tmp_path / "a.json"], "the model's forward called sys.exit"),
    ]
    for arguments, message in cases:
        status, out, err = guarded_main(capsys, *arguments, *data)
        assert status == 2 and out == "", (arguments, out + err)
        assert err.startswith("fesmia-hooks: error: ") and err.count("\n") == 1, err
        assert message in err and "Traceback" not in err, (arguments, err)
    assert not (tmp_path / "a.json").exists()


def test_text_encoders_that_exit_or_return_nothing_name_the_line(language, capsys, tmp_path):
    (tmp_path / "user.py").write_text(EXITING)
    text = ["--model", language / "trained_no_tokenizer", "--suspects",
            language / "suspects.txt", "--non-members", language / "non_members.txt"]
    status, _, err = guarded_main(capsys, *text, "--encode", f"{tmp_path / 'user.py'}:nothing")
    assert status == 2
    assert err == (f"fesmia-hooks: error: --suspects {language / 'suspects.txt'}: --encode "
                   "returned no token ids for line 1\n")
    status, _, err = guarded_main(capsys, *text, "--encode",
                                  f"{tmp_path / 'user.py'}:exits_on_a_line")
    assert status == 2 and err.count("\n") == 1
    assert "exits_on_a_line called sys.exit on line 1" in err


def test_loaders_warnings_stay_off_stderr(vision, capsys, tmp_path):
    pytest.importorskip("lightning")
    import warnings

    root = vision["root"]
    (tmp_path / "lit.py").write_text(LIGHTNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # a TorchScript file read as a checkpoint: Lightning's cloud_io warns, then fails
        status, out, err = guarded_main(
            capsys, "--model", root / "seen.pt", "--format", "lightning", "--lightning-module",
            f"{tmp_path / 'lit.py'}:Classifier", "--suspects", root / "suspects.pt",
            "--non-members", root / "non_members.pt")
    assert status == 2 and err.count("\n") == 1, err
    assert "cannot be loaded by" in err
    assert [str(w.message) for w in caught] == []


def test_a_tokenizers_length_warning_stays_off_stderr(language, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "short_tokenizer"
    folder.mkdir()
    for file in (language / "trained").iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    # the tokenizer warns of lines longer than 4 tokens ("... will result in indexing errors")
    AutoTokenizer.from_pretrained(folder, model_max_length=4).save_pretrained(folder)
    done = subprocess.run(
        console("--model", folder, "--suspects", language / "suspects.txt", "--non-members",
                language / "non_members.txt", *FAST),
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr == ""


def test_the_tools_own_message_is_not_told_as_an_unreadable_numpy_file(vision, capsys, tmp_path):
    root = vision["root"]
    np.save(tmp_path / "floats.npy", np.zeros((4, 6), dtype=np.float32))
    status, _, err = run_cli(capsys, "--model", root / "seen.pt", "--suspects",
                             tmp_path / "floats.npy", "--non-members", root / "non_members.pt")
    assert status == 2 and err.count("\n") == 1
    assert "holds 2-d float32 inputs without labels" in err
    assert "is not a readable numpy file" not in err and "CanaryError" not in err


def test_mismatched_image_folders_name_the_side_with_the_odd_class_folders(vision, capsys,
                                                                           tmp_path):
    import shutil

    root = vision["root"]
    if not vision["images"]:
        pytest.skip("Pillow is not installed")
    shutil.copytree(root / "suspects_img", tmp_path / "suspects_img")
    (tmp_path / "suspects_img" / "d_extra").mkdir()
    status, _, err = run_cli(capsys, "--model", root / "seen.pt", "--suspects",
                             tmp_path / "suspects_img", "--non-members", root / "non_members_img")
    assert status == 2 and err.count("\n") == 1
    assert f"'d_extra' only in --suspects {tmp_path / 'suspects_img'}" in err, err
    assert "only in --non-members" not in err


def test_boolean_token_ids_and_labels_are_refused(vision, capsys, tmp_path):
    root = vision["root"]
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).random((30, 8)) > 0.5)
    s_x, s_y = vision["suspects"]
    torch.save((s_x, s_y > 0), tmp_path / "bool_labels.pt")
    torch.save({"input_ids": torch.ones(30, 8, dtype=torch.bool)}, tmp_path / "bool_ids.pt")
    for suspects, message in (
            ("ids.npy", "ids.npy must be integer token ids, got torch.bool"),
            ("bool_ids.pt", "bool_ids.pt input_ids must be integer token ids, got torch.bool"),
            ("bool_labels.pt", "labels must be integer class indices, got torch.bool")):
        status, out, err = run_cli(capsys, "--model", root / "seen.pt", "--suspects",
                                   tmp_path / suspects, "--non-members", root / "non_members.pt",
                                   *FAST)
        assert status == 2 and out == "", out + err
        assert message in err and err.count("\n") == 1, err


def test_an_index_error_on_token_sequences_hints_at_vocabulary_and_context(language, capsys,
                                                                          tmp_path):
    rng = np.random.default_rng(1)
    for name, rows in (("long_s.txt", 20), ("long_n.txt", 20)):  # 80 tokens > 64 positions
        (tmp_path / name).write_text(
            "\n".join(" ".join(rng.choice(WORDS, 80)) for _ in range(rows)) + "\n")
    status, out, err = run_cli(capsys, "--model", language / "trained", "--suspects",
                               tmp_path / "long_s.txt", "--non-members", tmp_path / "long_n.txt",
                               *FAST)
    assert status == 2 and err.count("\n") == 1, out + err
    assert "the canary sequences are 80 tokens long" in err  # said before the model fails
    assert "longer than the model's context of 64 positions" in err
    assert err.rstrip().endswith("read as token sequences (try --max-length)"), err
    status, out, err = run_cli(capsys, "--model", language / "trained", "--suspects",
                               tmp_path / "long_s.txt", "--non-members", tmp_path / "long_n.txt",
                               "--max-length", "32", *FAST)
    assert status in (0, 1) and err == "", err
