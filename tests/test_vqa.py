"""The procedural VQA benchmark: generator, model round trip, training / resume and evaluation (fast).

The training scripts live outside the package, in the repository's ``training/vqa/`` (found from the repository
root: ``pythonpath = ["."]`` in pyproject's pytest options).
"""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.vqa import common as C
from training.vqa import pretrain as P
from training.vqa import ship as SHIP
from training.vqa import train as T
from vflowopt.vqa import evaluate as E
from vflowopt.vqa import model as M
from vflowopt.vqa import scenes as S

ROOT = Path(__file__).resolve().parents[1]


def _samples(n=12, seed=3):
    return [S.make_sample(i, seed=seed) for i in range(n)]


def test_generator_is_deterministic_and_splits_differ():
    a, b = S.make_sample(5, seed=7), S.make_sample(5, seed=7)
    assert a["scene"] == b["scene"] and a["qa"] == b["qa"]
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert S.make_sample(5, seed=8)["scene"] != a["scene"]
    assert S.make_sample(5, seed=7, split="test")["scene"] != a["scene"]
    json.dumps(a["scene"])  # the description is plain data
    assert a["image"].size == (224, 224)


def test_rendered_objects_match_the_description():
    checked = 0
    for sample in _samples():
        pixels = np.asarray(sample["image"], dtype=np.int16)
        labels = S.label_map(sample["scene"])
        for i, obj in enumerate(sample["scene"]["objects"]):
            cx, cy = int(obj["cx"]), int(obj["cy"])
            assert labels[cy, cx] == i + 1
            # a 3x3 neighbourhood of the centre has the object's colour (up to the mild global noise)
            patch = pixels[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(0)
            assert np.abs(patch - np.asarray(obj["rgb"])).max() < 12, (obj, patch)
            checked += 1
        for digit in sample["scene"]["digits"]:
            x0, y0, x1, y1 = digit["bbox"]
            region = pixels[y0:y1, x0:x1]
            ink = (region.max(-1) < 90).sum()
            plate = (np.abs(region - np.asarray(S.DIGIT_PLATE)).max(-1) < 25).sum()
            assert ink > 10 and plate > ink  # dark glyph pixels on a light plate
    assert checked > 20


def test_answers_follow_the_description():
    seen = set()
    for sample in _samples(30):
        objs = sample["scene"]["objects"]
        for qa in sample["qa"]:
            seen.add(qa["type"])
            words = qa["question"].split()
            if qa["type"] == "exists":
                colour, shape = words[3], words[4]
                present = any(o["colour"] == colour and o["shape"] == shape for o in objs)
                assert qa["answer"] == ("yes" if present else "no")
            elif qa["type"] == "count":
                if words[3] == "objects":
                    n = sum(o["colour"] == words[2] for o in objs)
                else:
                    shape = {v: k for k, v in S.PLURALS.items()}[words[2]]
                    n = sum(o["shape"] == shape for o in objs)
                assert qa["answer"] == S.COUNT_WORDS[n]
            elif qa["type"] == "colour":
                matches = [o for o in objs if o["shape"] == words[4]]
                assert len(matches) == 1 and matches[0]["colour"] == qa["answer"]
            elif qa["type"] == "digit":
                assert qa["answer"] == str(sample["scene"]["digits"][0]["value"])
            elif qa["type"] == "position":
                a = next(o for o in objs if (o["colour"], o["shape"]) == (words[2], words[3]))
                b = next(o for o in objs if (o["colour"], o["shape"]) == (words[-3], words[-2]))
                expected = {"left": a["cx"] < b["cx"], "right": a["cx"] > b["cx"],
                            "above": a["cy"] < b["cy"], "below": a["cy"] > b["cy"]}
                assert expected[qa["answer"]]
    assert seen == set(S.QUESTION_TYPES)


def test_patch_targets_cover_objects_and_digits():
    sample = S.make_sample(1, seed=3)
    targets = S.patch_targets(sample["scene"])
    assert all(v.shape == (256,) for v in targets.values())
    assert (targets["colour"] > 0).sum() >= len(sample["scene"]["objects"])
    assert targets["centre"].sum() == len(sample["scene"]["objects"])
    if sample["scene"]["digits"]:
        assert (targets["digit"] == sample["scene"]["digits"][0]["value"] + 1).any()


@pytest.fixture(scope="module")
def tiny_saved(tmp_path_factory):
    model, processor = M.build_model("tiny", seed=0)
    path = M.save(model, processor, tmp_path_factory.mktemp("vqa") / "model")
    return model, processor, path


def test_model_round_trip_offline(tiny_saved):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vflowopt.tiny import build_inputs

    model, processor, path = tiny_saved
    loaded = LlavaForConditionalGeneration.from_pretrained(str(path), local_files_only=True).eval()
    proc2 = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    sample = S.make_sample(0)
    batch = build_inputs(proc2, [sample["image"]], [sample["qa"][0]["question"]])
    assert int((batch["input_ids"] == loaded.config.image_token_index).sum()) >= 256
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, loaded(**batch).logits)
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 25e6
    # training-time encoding = processor encoding (pixels and the first turn's tokens)
    assert torch.allclose(C.pixel_values(sample["image"]), batch["pixel_values"][0], atol=1e-4)
    ids, _, _ = C.encode_qa(proc2.tokenizer, sample["qa"][:1], 256)
    assert ids[: batch["input_ids"].shape[1]] == batch["input_ids"][0].tolist()


def test_base_preset_fits_the_size_limit():
    config = M.build_config("base")
    assert config.vision_config.image_size // config.vision_config.patch_size == 16
    with torch.device("meta"):
        from transformers import LlavaForConditionalGeneration

        n = M.num_parameters(LlavaForConditionalGeneration(config))
    assert n * 4 < 25e6


def test_training_runs_and_resumes(tmp_path):
    common = ["--out", str(tmp_path), "--preset", "tiny", "--batch", "2", "--qa-min", "2", "--qa-max", "3",
              "--log-every", "1", "--save-every", "2", "--eval-every", "0", "--warmup", "1", "--threads", "2"]
    T.main(["--steps", "2", *common])
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and (tmp_path / "model" / "config.json").exists()
    T.main(["--steps", "3", "--resume", *common])
    records = [json.loads(line) for line in (tmp_path / "train.log").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == [1, 2, 3]
    assert any(r.get("event") == "resume" and r["step"] == 2 for r in records)
    resumed = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert resumed["step"] == 3
    loaded, _ = M.load(tmp_path / "model")
    assert not any("aux" in k for k in loaded.state_dict())
    # the resumed run continued the trajectory of an uninterrupted one (weights and optimizer restored: the
    # step-3 update matches bit for bit; the learning curve carried over)
    straight = tmp_path / "straight"
    T.main(["--steps", "3", *common[2:], "--out", str(straight)])
    ref = torch.load(straight / "checkpoint.pt", weights_only=True)
    for part in ("model", "aux"):
        assert all(torch.equal(ref[part][k], resumed[part][k]) for k in ref[part])
    assert [h["loss"] for h in ref["history"]] == [h["loss"] for h in resumed["history"]]
    assert ref["flags"] == resumed["flags"]


def test_batches_are_deterministic_by_seed():
    args = T.parse_args(["--out", "x", "--steps", "10", "--batch", "2"])
    tok = M.build_tokenizer()
    a, b = T.make_batch(tok, args, 4), T.make_batch(tok, args, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["pixel_values"], T.make_batch(tok, args, 5)["pixel_values"])


def test_evaluate_writes_documented_json(tiny_saved, tmp_path):
    _, _, path = tiny_saved
    out = tmp_path / "eval.json"
    from vflowopt.cli import main as cli_main

    assert cli_main(["eval", "--model", str(path), "--methods", "random,visionzip", "--budgets", "1.0,0.25",
                     "--n", "5", "--json", str(out), "--threads", "2"]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 5 and result["question_types"] == list(S.QUESTION_TYPES)
    assert set(result["full"]) == {"accuracy", "per_type"}
    assert len(result["results"]) == 4
    for r in result["results"]:
        assert {"method", "budget", "status", "accuracy", "relative_accuracy", "per_type", "reason"} <= set(r)
        assert r["status"] in ("ok", "refused")
        if r["status"] == "ok":
            assert set(r["per_type"]) == set(S.QUESTION_TYPES) and 0 <= r["accuracy"] <= 1
    assert any(r["status"] == "ok" for r in result["results"])


def test_time_limit_stops_cleanly_and_resumes(tmp_path):
    common = ["--out", str(tmp_path), "--preset", "tiny", "--batch", "2", "--qa-min", "2", "--qa-max", "2",
              "--log-every", "1", "--save-every", "100", "--eval-every", "0", "--threads", "2", "--steps", "4"]
    T.main([*common, "--max-minutes", "1e-6"])
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 1
    T.main([*common, "--resume"])
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 4


def test_resume_restores_the_rng_states_from_plain_data(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # numpy keeps a cached gaussian: part of the state
    C.save_checkpoint({"rng": T._rng_state()}, tmp_path / "rng.pt")
    expected = [random.random(), random.gauss(0, 1), np.random.randn(), np.random.rand(), torch.rand(3)]
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    state = C.load_checkpoint(tmp_path / "rng.pt")["rng"]
    assert isinstance(state["python"][1], list) and isinstance(state["numpy"]["state"]["key"], list)
    json.dumps({k: v for k, v in state.items() if k in ("python", "numpy")})  # plain data
    T._set_rng_state(state)
    got = [random.random(), random.gauss(0, 1), np.random.randn(), np.random.rand(), torch.rand(3)]
    assert got[:4] == expected[:4] and torch.equal(got[4], expected[4])
    # what weights_only could not read back is refused when writing, not when resuming
    with pytest.raises(TypeError, match="numpy"):
        C.save_checkpoint({"history": [{"loss": np.float64(1.0)}]}, tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()


def _crafted_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint whose unpickling runs ``os.makedirs(marker)`` (as any code could run)."""

    class RunsCode:
        def __reduce__(self):
            return os.makedirs, (str(marker),)

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 1, "args": {}, "payload": RunsCode()}, path)
    return path


def _pickle_calls(path: Path) -> set[tuple[str, str]]:
    """(module, name) of every global a torch.save file's pickle imports, read with pickletools (nothing
    is unpickled), provided the pickle also calls something (a REDUCE opcode)."""
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    found, strings, reduces = set(), [], 0
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.add((strings[-2], strings[-1]))
        elif op.name == "GLOBAL":
            found.add(tuple(arg.split(" ", 1)))
        elif op.name == "REDUCE":
            reduces += 1
    return found if reduces else set()


def _init_folder(tmp_path: Path, tiny_saved, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny_saved[2], folder / "model")
    return folder


# every checkpoint the training CLI reads: (file to craft, command line); "{t}" is the test's tmp_path
CRAFTED_LOADERS = {
    "train --resume": ("run/checkpoint.pt",
                       lambda t: T.main(["--out", f"{t}/run", "--steps", "2", "--resume", "--preset", "tiny",
                                         "--eval-every", "0"])),
    "train --init match.pt": ("init/match.pt",
                              lambda t: T.main(["--out", f"{t}/run", "--steps", "1", "--init", f"{t}/init",
                                                "--preset", "tiny", "--eval-every", "0"])),
    "train --init aux.pt": ("init_model/aux.pt",
                            lambda t: T.main(["--out", f"{t}/run", "--steps", "1", "--init", f"{t}/init_model",
                                              "--preset", "tiny", "--eval-every", "0"])),
    "train --init symbolic.pt": ("init_model/symbolic.pt",
                                 lambda t: T.main(["--out", f"{t}/run", "--steps", "1", "--init",
                                                   f"{t}/init_model", "--preset", "tiny", "--eval-every", "0"])),
    "pretrain --resume": ("lm/stage.pt",
                          lambda t: P.main(["lm", "--out", f"{t}/lm", "--steps", "2", "--resume",
                                            "--preset", "tiny"])),
    "pretrain connect --lm": ("lm/stage.pt",
                              lambda t: P.main(["connect", "--out", f"{t}/c", "--steps", "1", "--lm", f"{t}/lm",
                                                "--vision", f"{t}/vision", "--preset", "tiny"])),
    "pretrain connect --vision": ("vision/stage.pt",
                                  lambda t: P.main(["connect", "--out", f"{t}/c", "--steps", "1", "--lm",
                                                    f"{t}/lm", "--vision", f"{t}/vision", "--preset", "tiny"])),
}


@pytest.mark.parametrize("loader", list(CRAFTED_LOADERS))
def test_crafted_pickle_checkpoints_are_refused_before_running_code(tmp_path, tiny_saved, loader):
    crafted, run = CRAFTED_LOADERS[loader]
    if crafted.startswith("init_model/"):  # a connect folder with its model: the loader reached is the .pt file
        _init_folder(tmp_path, tiny_saved, "init_model")
    if loader == "pretrain connect --vision":  # a genuine LM stage: the vision stage is the one crafted
        (tmp_path / "lm").mkdir()
        C.save_checkpoint({"args": {"question_first": False}}, tmp_path / "lm" / "stage.pt")
    marker = tmp_path / "code_ran"
    _crafted_checkpoint(tmp_path / crafted, marker)
    with pytest.raises(SystemExit, match="refused to load .*could run code") as err:
        run(tmp_path)
    assert str(tmp_path / crafted) in str(err.value) and "os.makedirs" in str(err.value)
    assert not marker.exists()
    assert not (tmp_path / "run" / "train.log").exists() and not (tmp_path / "c" / "model").exists()
    # the file is live: its pickle imports os.makedirs and calls it (read as opcodes, never executed)
    assert _pickle_calls(tmp_path / crafted) & {("os", "makedirs"), ("posix", "makedirs")}


def test_the_package_never_imports_the_training_tools():
    package = ROOT / "src" / "vflowopt"
    for name in ("train", "pretrain", "attn_supervision", "ship"):
        assert not (package / "vqa" / f"{name}.py").exists()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n == "training" or n.startswith("training.") for n in names), path
    # the training CLI runs from a clone's root
    out = subprocess.run([sys.executable, "-m", "training.vqa.train", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "--resume" in out.stdout, out.stderr
    for main in (P.main, SHIP.main):
        with pytest.raises(SystemExit) as err:
            main(["--help"])
        assert err.value.code == 0


def test_symbolic_tokens_and_corruption():
    desc = S.sample_scene(S.scene_rng("train", 0, 1))
    targets = {k: torch.from_numpy(v)[None] for k, v in S.patch_targets(desc).items()}
    sym = P.SymbolicTokens(32)
    tokens = sym(targets)
    assert tokens.shape == (1, 256, 32)
    same = P.corrupt(targets, 0.0, torch.Generator().manual_seed(0))
    assert all(torch.equal(same[k], targets[k]) for k in targets)
    flipped = P.corrupt(targets, 1.0, torch.Generator().manual_seed(0))
    assert any(not torch.equal(flipped[k], targets[k]) for k in targets)
    background = torch.stack(list(targets.values()), -1).eq(0).all(-1)
    assert all(torch.equal(flipped[k][background], targets[k][background]) for k in targets)
    for k, n in S.PATCH_CLASSES.items():
        assert int(flipped[k].max()) < n
    # two patches with the same classes in different places differ only by their position embeddings
    a = sym({k: torch.zeros(1, 256, dtype=torch.long) for k in S.PATCH_CLASSES})
    assert not torch.allclose(a[0, 0], a[0, 17])


@pytest.mark.parametrize("question_first", [False, True])
def test_decoupled_pretraining_connects_and_fine_tunes(tmp_path, question_first):
    common = ["--preset", "tiny", "--batch", "2", "--qa-min", "2", "--qa-max", "3", "--log-every", "1",
              "--threads", "1", "--warmup", "1"]
    P.main(["lm", "--out", str(tmp_path / "lm"), "--steps", "2", *common,
            *(["--question-first"] if question_first else [])])
    P.main(["vision", "--out", str(tmp_path / "vision"), "--steps", "2", *common])
    P.main(["lm", "--out", str(tmp_path / "lm"), "--steps", "3", "--resume", *common])
    assert torch.load(tmp_path / "lm" / "stage.pt", weights_only=True)["step"] == 3
    P.main(["connect", "--out", str(tmp_path / "c"), "--steps", "2", "--lm", str(tmp_path / "lm"),
            "--vision", str(tmp_path / "vision"), *common])
    connected, _ = M.load(tmp_path / "c" / "model")
    lm_state = torch.load(tmp_path / "lm" / "stage.pt", weights_only=True)["parts"]["lm"]
    key = next(iter(lm_state))
    assert torch.equal(connected.model.language_model.state_dict()[key], lm_state[key])
    T.main(["--out", str(tmp_path / "j"), "--steps", "1", "--init", str(tmp_path / "c"), "--preset", "tiny",
            "--align-weight", "1", "--schedule", "joint", "--batch", "2", "--qa-min", "2", "--qa-max", "2",
            "--eval-every", "0", "--threads", "2", "--scale-weight", "0"])
    records = [json.loads(line) for line in (tmp_path / "j" / "train.log").read_text().splitlines()]
    assert any("align_rel_mse" in r for r in records if r["kind"] == "train")
    # the layout travels lm -> connect -> joint -> the saved processor
    assert records[0]["args"]["question_first"] is question_first
    _, processor = M.load(tmp_path / "j" / "model")
    assert (processor.chat_template == M.QUESTION_FIRST_TEMPLATE) is question_first


def test_symbolic_tokens_can_carry_the_word_embeddings_of_their_classes():
    tokenizer = M.build_tokenizer()
    words = torch.nn.Embedding(len(tokenizer), 8)
    sym = P.SymbolicTokens(8, word_ids=P.class_word_ids(tokenizer))
    targets = {k: torch.zeros(1, 256, dtype=torch.long) for k in S.PATCH_CLASSES}
    targets["colour"][0, 5] = S.COLOUR_IDS["red"]
    plain = P.SymbolicTokens(8)
    plain.load_state_dict({k: v for k, v in sym.state_dict().items() if not k.startswith("word_ids")})
    delta = sym(targets, words) - plain(targets)
    assert torch.allclose(delta[0, 5], words.weight[tokenizer.convert_tokens_to_ids("red")])
    assert delta[0, 6].abs().max() == 0  # class "none" adds no word
    with pytest.raises(ValueError, match="words="):
        sym(targets)
    rebuilt = P.symbolic_from_state(sym.state_dict(), 8)
    assert torch.equal(rebuilt(targets, words), sym(targets, words))
    ids = P.position_word_ids(tokenizer)
    placed = P.SymbolicTokens(8, word_ids=P.class_word_ids(tokenizer), position_word_ids=ids)
    placed.load_state_dict(sym.state_dict(), strict=False)
    left, right, above, below = words.weight[ids]
    extra = placed(targets, words) - sym(targets, words)
    assert torch.allclose(extra[0, 0], left + above, atol=1e-6)  # row 0, column 0
    assert torch.allclose(extra[0, 255], right + below, atol=1e-6)
    assert torch.equal(P.symbolic_from_state(placed.state_dict(), 8)(targets, words), placed(targets, words))


def test_referents_name_the_patches_each_question_is_about():

    desc = {"width": 224, "height": 224, "background": {"kind": "noise", "seed": 1, "level": 0.0}, "digits": [],
            "objects": [{"shape": "square", "colour": "red", "size": "large", "bbox": [14, 14, 56, 56], "cx": 35,
                         "cy": 35},
                        {"shape": "circle", "colour": "blue", "size": "large", "bbox": [140, 140, 182, 182],
                         "cx": 161, "cy": 161}]}
    t = S.patch_targets(desc)
    red_square, blue_circle = t["colour"] == S.COLOUR_IDS["red"], t["colour"] == S.COLOUR_IDS["blue"]
    ask = lambda qtype, q: S.referents(t, {"type": qtype, "question": q})  # noqa: E731
    assert np.array_equal(ask("exists", "is there a red square ?") == 1, red_square)
    assert not ask("exists", "is there a red circle ?").any()  # hard negative: colour and shape apart
    assert np.array_equal(ask("colour", "what colour is the circle ?") == 1, blue_circle)
    assert np.array_equal(ask("count", "how many squares are there ?") == 1, red_square)
    assert np.array_equal(ask("count", "how many blue objects are there ?") == 1, blue_circle)
    both = ask("position", "is the blue circle left or right of the red square ?")
    assert np.array_equal(both == 1, blue_circle) and np.array_equal(both == 2, red_square)


def test_match_probe_trains_on_question_first_sequences(tmp_path):
    common = ["--preset", "tiny", "--batch", "2", "--qa-min", "2", "--qa-max", "2", "--log-every", "1",
              "--threads", "1", "--warmup", "1", "--question-first", "--match-weight", "1", "--match-layer", "1"]
    P.main(["lm", "--out", str(tmp_path / "lm"), "--steps", "2", "--bg-ramp", "0.5", "--word-tokens",
            "--ordered-positions", *common])
    # a deliberate recipe change on resume: explicit flags override the checkpoint's, the rest is kept
    P.main(["lm", "--out", str(tmp_path / "lm"), "--steps", "3", "--resume", "--position-words",
            "--threads", "1", "--log-every", "1"])
    records = [json.loads(line) for line in (tmp_path / "lm" / "train.log").read_text().splitlines()]
    change = [r for r in records if r.get("event") == "recipe_change"]
    assert change == [{"kind": "event", "event": "recipe_change", "step": 2, "changed": {"position_words": True}}]
    state = torch.load(tmp_path / "lm" / "stage.pt", weights_only=True)
    assert state["args"]["question_first"] and state["args"]["position_words"] and state["step"] == 3
    assert "position_word_ids" in state["parts"]["symbolic"]
    assert all("match_loss" in r for r in records if r["kind"] == "train")
    P.main(["vision", "--out", str(tmp_path / "vision"), "--steps", "1", *common[:-4]])
    P.main(["connect", "--out", str(tmp_path / "c"), "--steps", "1", "--lm", str(tmp_path / "lm"),
            "--vision", str(tmp_path / "vision"), *common[:-5]])
    assert (tmp_path / "c" / "match.pt").is_file()
    joint = ["--out", str(tmp_path / "j"), "--init", str(tmp_path / "c"), "--preset", "tiny", "--schedule", "joint",
             "--batch", "2", "--qa-min", "2", "--qa-max", "2", "--eval-every", "0", "--threads", "1",
             "--match-weight", "1", "--log-every", "1"]
    with pytest.raises(SystemExit, match="match.pt"):  # a connect folder without a probe: refused, not ignored
        T.main(["--steps", "1", "--out", str(tmp_path / "j0"), "--preset", "tiny", "--match-weight", "1",
                "--eval-every", "0"])
    T.main(["--steps", "1", *joint])
    T.main(["--steps", "2", "--resume", *joint])
    records = [json.loads(line) for line in (tmp_path / "j" / "train.log").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert all("match_recall" in r for r in records if r["kind"] == "train")
    assert torch.load(tmp_path / "j" / "checkpoint.pt", weights_only=True)["match"] is not None
    with pytest.raises(SystemExit, match="question-first"):  # image tokens precede the question
        P.main(["lm", "--out", str(tmp_path / "nq"), "--steps", "1", "--preset", "tiny", "--match-weight", "1"])
    with pytest.raises(SystemExit, match="match-layer"):
        P.main(["lm", "--out", str(tmp_path / "bad"), "--steps", "1", *common[:-1], "5"])


def test_question_first_sequences_match_the_chat_template():
    from vflowopt.tiny import build_inputs

    processor = M.build_processor(question_first=True)
    qa = [{"type": "colour", "question": "what colour is the square ?", "answer": "red"}]
    ids, labels, types = C.encode_qa(processor.tokenizer, qa, 256, question_first=True)
    prompt = build_inputs(processor, [Image.new("RGB", (224, 224))], [qa[0]["question"]])["input_ids"][0].tolist()
    assert ids[: len(prompt)] == prompt  # training sees exactly what inference feeds
    assert labels[len(prompt):] == ids[len(prompt):] and types[len(prompt)] == S.QUESTION_TYPES.index("colour")
    with pytest.raises(ValueError, match="one question"):
        C.encode_qa(processor.tokenizer, qa * 2, 256, question_first=True)
    batch = T.make_batch(processor.tokenizer, T.parse_args(["--out", "x", "--steps", "1", "--batch", "2",
                                                            "--qa-min", "3", "--qa-max", "3", "--question-first"]), 0)
    assert batch["input_ids"].shape[0] == 6 and batch["pixel_values"].shape[0] == 2
    assert batch["scene_index"].tolist() == [0, 0, 0, 1, 1, 1]


def test_eval_command_json_and_strategy(tiny_saved, tmp_path, capsys):
    import vflowopt
    from vflowopt.cli import main

    _, _, path = tiny_saved
    strategy = tmp_path / "s.json"
    vflowopt.config_for("random", budget=0.5).save(strategy)
    out = tmp_path / "eval.json"
    code = main(["eval", "--model", str(path), "--methods", "random,fastv", "--budgets", "1.0,0.1", "--n", "5",
                 "--strategy", str(strategy), "--json", str(out), "--threads", "2"])
    assert code == 0
    table = capsys.readouterr().out
    assert "random*" in table and "refused" in table  # FastV cannot reach 0.1 on a 1-layer LM
    result = json.loads(out.read_text())
    assert [(r["method"], r["budget"]) for r in result["results"]] == [
        ("random", 1.0), ("random", 0.1), ("fastv", 1.0), ("fastv", 0.1), ("random", 0.5)]
    assert result["results"][-1]["strategy"] == str(strategy) and result["results"][-1]["label"] is None
    # a labelled strategy row, e.g. the one `optimize --methods all` chose
    code = main(["eval", "--model", str(path), "--methods", "random", "--budgets", "0.5", "--n", "5",
                 "--strategy", f"auto={strategy}", "--json", str(out), "--threads", "2"])
    assert code == 0 and "auto (random)" in capsys.readouterr().out
    labelled = json.loads(out.read_text())["results"][-1]
    assert labelled["label"] == "auto" and labelled["strategy"] == str(strategy)
    assert labelled["accuracy"] == result["results"][-1]["accuracy"]
    assert main(["eval", "--model", str(path), "--n", "1", "--strategy", "auto="]) == 2
    assert "no file after 'auto='" in capsys.readouterr().err
    assert main(["eval", "--model", str(path), "--methods", "nosuch", "--n", "1"]) == 2
    assert "unknown method 'nosuch'" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--n", "1"]) == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.fixture(scope="module")
def shipped():
    return M.load(M.shipped_model_path())


def test_shipped_model_answers_the_shipped_samples(shipped):
    from importlib import resources

    from PIL import Image

    model, processor = shipped
    size = sum(f.stat().st_size for f in M.shipped_model_path().iterdir())
    assert size < 25e6
    assert (M.shipped_model_path() / "README.md").is_file()
    folder = resources.files("vflowopt").joinpath("assets", "samples")
    lines = folder.joinpath("samples.jsonl").read_text().splitlines()
    items = []
    for line in lines:
        rec = json.loads(line)
        with folder.joinpath(rec["image"]).open("rb") as fh:
            items.append({**rec, "image": Image.open(fh).convert("RGB"), "question": rec["prompt"]})
    assert len(items) >= 10 and {it["type"] for it in items} == set(S.QUESTION_TYPES)
    assert E.answer_questions(model, processor, items) == [it["answer"] for it in items]
    # the samples are the scenes they claim to be (regenerated from split, seed and index)
    first = items[0]
    desc = S.sample_scene(S.scene_rng("val", 7, first["scene_index"]))
    assert np.array_equal(np.asarray(S.render(desc)), np.asarray(first["image"]))


def test_the_shipped_model_ships_its_strategy_and_run_uses_it(shipped, capsys):
    """`vflowopt run` with no --method/--budget/--strategy uses the strategy that `vflowopt optimize --methods
    all --budget 0.25` found for the shipped model (assets/vqa_model/vflowopt_strategy.json)."""
    import vflowopt
    from vflowopt.cli import main

    model, _ = shipped
    cfg = vflowopt.load_config(M.shipped_model_path() / "vflowopt_strategy.json")
    assert cfg.budget == 0.25 and cfg.model_family == "llava" and cfg.num_layers == 8
    with vflowopt.pruned(model, cfg):  # it applies to the shipped model as it is
        pass
    assert "vflowopt optimize --methods all --budget 0.25" in (M.shipped_model_path() / "README.md").read_text()
    assert main(["run", "--json", "--max-new-tokens", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == cfg.method and report["strategy_source"].startswith("shipped with the model")
    assert report["mean_retention"] == pytest.approx(0.25, abs=0.02)


def test_run_defaults_to_the_shipped_model_and_sample(capsys):
    from vflowopt.cli import main

    assert main(["run", "--json", "--budget", "1.0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"].startswith("shipped vqa-llava") and report["random_weights"] is False
    assert report["visual_tokens"] == 256
    assert report["answer"] == report["expected_answer"]
    assert main(["run", "--image", "x.png"]) == 2
    assert "--prompt is required with --image" in capsys.readouterr().err


def test_background_dropping_keeps_positions_and_is_exact_when_keeping_all():
    model, processor = M.build_model("tiny", seed=0)
    model.eval()
    args = P.parse_args(["lm", "--out", "x", "--steps", "10", "--batch", "3", "--qa-min", "2", "--qa-max", "4"])
    batch = P.lm_batch(processor.tokenizer, args, 0, C.parse_type_weights(args.type_weights))
    tokens = P.SymbolicTokens(32)(P.targets_of(batch)).detach()
    image_id = model.config.image_token_id
    gen = torch.Generator().manual_seed(0)
    kept, kept_tokens, positions = P.drop_background(batch, tokens, image_id, 1.0, gen)
    with torch.no_grad():
        full = P.answer_stats(P.lm_logits(model, batch["input_ids"], batch["attention_mask"], tokens), batch)[0]
        same = P.answer_stats(P.lm_logits(model, kept["input_ids"], kept["attention_mask"], kept_tokens,
                                          positions), kept)[0]
    assert torch.allclose(full, same, atol=1e-5)
    dropped, dropped_tokens, positions = P.drop_background(batch, tokens, image_id, 0.0, gen)
    n_objects = int((torch.stack([batch[f"patch_{k}"] for k in S.PATCH_CLASSES], -1) != 0).any(-1).sum())
    assert int((dropped["input_ids"] == image_id).sum()) == n_objects == dropped_tokens.shape[0]
    for b in range(3):  # every answer survives, at its original position
        valid = dropped["attention_mask"][b] == 1
        assert torch.equal(dropped["labels"][b][valid][dropped["labels"][b][valid] != -100],
                           batch["labels"][b][batch["labels"][b] != -100])
        assert torch.equal(batch["input_ids"][b][positions[b][valid]], dropped["input_ids"][b][valid])


def test_attention_supervision_matches_eager_attention_and_its_targets(tmp_path):
    from training.vqa import attn_supervision as A

    args = T.parse_args(["--out", str(tmp_path), "--steps", "1", "--preset", "tiny", "--batch", "3",
                         "--qa-min", "5", "--qa-max", "5", "--question-first", "--seed", "0",
                         "--type-weights", "exists=1,colour=1,count=1,position=20,digit=1"])
    model, proc = M.build_model("tiny", "qwen2", seed=0, question_first=True)
    model.set_attn_implementation("eager")
    batch = T.make_batch(proc.tokenizer, args, 0)
    taps, tap = T.Taps(model), A.AttentionTap(model, 0)
    weights = {}
    hook = model.model.language_model.layers[0].self_attn.register_forward_hook(
        lambda m, a, o: weights.__setitem__("w", o[1]))
    with torch.no_grad():
        T.forward_answers(model, taps, batch)
        query = A.answer_positions(batch["labels"])
        logp = tap.answer_log_attention(query)
    hook.remove()
    rows = torch.arange(len(query))
    # the recomputed row is the layer's own attention at the position that predicts the answer
    torch.testing.assert_close(logp.exp(), weights["w"][rows, : A.SUPERVISED_HEADS, query], atol=1e-6, rtol=1e-5)
    assert (batch["labels"][rows, query + 1] != -100).all() and (batch["labels"][rows, query] == -100).all()
    target = A.attention_targets(batch, model.config.image_token_id)
    torch.testing.assert_close(target.sum(-1), torch.ones(len(query), A.SUPERVISED_HEADS))
    assert (target[:, :, 0] > 0).all()  # <s> (the sink) is always a target
    image = batch["input_ids"] == model.config.image_token_id
    types = batch["answer_type"].max(-1).values
    for i in range(len(query)):
        on_image = target[i][:, image[i]] > 0
        centre = batch["patch_centre"][batch["scene_index"][i]] > 0
        referent = batch["referent"][i]
        if S.QUESTION_TYPES[types[i]] == "digit":
            assert torch.equal(on_image[0], referent == 1)
        else:
            assert torch.equal(on_image[0], (referent == 1) & centre)
        assert torch.equal(on_image[1], (referent == 2) & centre)
    assert set(types.tolist()) == set(range(len(S.QUESTION_TYPES)))  # every type, both heads exercised
    loss, logs = A.attention_loss(tap, batch, model.config.image_token_id)
    assert loss.item() > 0 and 0 <= logs["attn_target_mass"] <= 1
    tap.remove()
    taps.remove()
    with pytest.raises(ValueError, match="attn-layer 5"):
        A.AttentionTap(model, 5)


def test_attention_supervision_trains_and_is_a_logged_recipe_change_on_resume(tmp_path):
    common = ["--out", str(tmp_path), "--preset", "tiny", "--batch", "2", "--qa-min", "2", "--qa-max", "2",
              "--question-first", "--eval-every", "0", "--log-every", "1", "--threads", "1", "--warmup", "1"]
    T.main(["--steps", "1", *common])
    T.main(["--steps", "2", "--resume", "--attn-weight", "0.5", "--attn-layer", "0", *common[:2]])
    records = [json.loads(line) for line in (tmp_path / "train.log").read_text().splitlines()]
    assert [r for r in records if r.get("event") == "recipe_change"] == [
        {"kind": "event", "event": "recipe_change", "step": 1, "changed": {"attn_layer": 0, "attn_weight": 0.5}}]
    train = [r for r in records if r["kind"] == "train"]
    assert "attn_loss" not in train[0] and "attn_loss" in train[1]
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["args"]["attn_weight"] == 0.5 and ckpt["args"]["question_first"]
    with pytest.raises(SystemExit, match="question-first"):
        T.main(["--steps", "1", "--out", str(tmp_path / "x"), "--preset", "tiny", "--attn-weight", "1",
                "--eval-every", "0"])
    with pytest.raises(SystemExit, match="attn-layer 3"):
        T.main(["--steps", "1", *common[2:], "--out", str(tmp_path / "y"), "--attn-weight", "1", "--attn-layer", "3"])
    assert not (tmp_path / "y" / "train.log").exists()  # refused before anything was logged
