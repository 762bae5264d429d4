"""Sliding windows over long texts: coverage, the cap, batching across texts, aggregation, and training on windows."""

import json

import numpy as np
import pytest
import torch

from lightning_cls.data.tokenization import load_tokenizer
from lightning_cls.data.windows import WindowedTexts, WindowSpec, mean_logits_per_text, window_token_ids
from lightning_cls.errors import ConfigError


@pytest.fixture(scope="module")
def tokenizers(sample_dir):
    return {name: load_tokenizer(str(sample_dir / name)) for name in ("wordpiece", "bpe")}


def long_text(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    words = ["quantum", "field", "graph", "energy", "lattice", "neural", "galaxy", "spin", "proof", "signal"]
    return " ".join(rng.choice(words, n_words))


@pytest.mark.parametrize("name", ["wordpiece", "bpe"])
@pytest.mark.parametrize("stride", [None, 1, 5, 14])
def test_windows_cover_every_token_in_order(tokenizers, name, stride):
    tok = tokenizers[name]
    spec = WindowSpec(max_length=16, max_windows=1000, stride=stride)
    text = long_text(120)
    whole = tok(text, add_special_tokens=False)["input_ids"]
    w = window_token_ids(tok, [text], spec)
    special = tok.num_special_tokens_to_add()
    body, step = spec.body(tok), spec.step(tok)
    assert all(len(ids) <= 16 for ids in w.input_ids)
    # Window i holds the text's tokens [i * step, i * step + body): strip the special tokens and compare.
    for i, ids in enumerate(w.input_ids):
        content = [t for t in ids if t not in tok.all_special_ids] if special else ids
        assert content == whole[i * step : i * step + body]
    covered = set()
    for i, ids in enumerate(w.input_ids):
        covered.update(range(i * step, i * step + len(ids) - special))
    assert covered == set(range(len(whole)))  # every token read, none past the end
    assert w.counts.tolist() == [len(w.input_ids)] and not w.cut.any()
    assert w.tokens.tolist() == [len(whole)]


def test_the_cap_holds_and_says_it_cut(tokenizers):
    tok = tokenizers["wordpiece"]
    texts = [long_text(400, seed=1), "short text", long_text(6, seed=2)]
    w = window_token_ids(tok, texts, WindowSpec(max_length=16, max_windows=3))
    assert w.counts.tolist()[0] == 3 and w.cut.tolist() == [True, False, False]
    assert w.counts.tolist()[1] == 1 and len(w.input_ids) == w.counts.sum()
    assert w.text_index.tolist() == [0, 0, 0] + [1] + [2] * int(w.counts[2])
    # One window is plain truncation: the same ids as the tokenizer's own truncation, and `cut` says truncated.
    one = window_token_ids(tok, texts, WindowSpec(max_length=16, max_windows=1))
    assert one.input_ids == tok(texts, truncation=True, max_length=16)["input_ids"]
    assert one.cut.tolist() == [True, False, True]


def test_a_text_gets_the_same_windows_alone_or_among_others(tokenizers):
    tok, spec = tokenizers["bpe"], WindowSpec(max_length=12, max_windows=5, stride=6)
    texts = [long_text(n, seed=n) for n in (3, 80, 30, 200)]
    together = window_token_ids(tok, texts, spec)
    for t, text in enumerate(texts):
        alone = window_token_ids(tok, [text], spec)
        assert [together.input_ids[i] for i in np.flatnonzero(together.text_index == t)] == alone.input_ids
        assert (together.counts[t], together.cut[t], together.tokens[t]) == (
            alone.counts[0],
            alone.cut[0],
            alone.tokens[0],
        )


def test_mean_logits_do_not_depend_on_batch_composition():
    logits = torch.randn(7, 4)
    text_index = np.array([0, 0, 1, 2, 2, 2, 3])
    out = mean_logits_per_text(logits, text_index, 4)
    expected = torch.stack([logits[text_index == t].mean(0) for t in range(4)])
    torch.testing.assert_close(out, expected)
    perm = np.random.default_rng(0).permutation(7)  # the same windows in another order: the same answer
    torch.testing.assert_close(mean_logits_per_text(logits[perm], text_index[perm], 4), out)
    torch.testing.assert_close(out[1], logits[2])  # one window: its own logits, exactly


def test_bad_window_settings_are_refused_in_one_line(tokenizers):
    with pytest.raises(ConfigError, match="max_windows must be at least 1"):
        WindowSpec(16, max_windows=0)
    with pytest.raises(ConfigError, match="window_stride must be at least 1"):
        WindowSpec(16, max_windows=2, stride=0)
    with pytest.raises(ConfigError, match="window_stride 15 is longer than a window's 14 text tokens"):
        WindowSpec(16, max_windows=2, stride=15).step(tokenizers["wordpiece"])


def test_windowed_texts_across_chunks_keep_text_positions(tokenizers):
    tok, spec = tokenizers["wordpiece"], WindowSpec(max_length=16, max_windows=4)
    chunks = [[long_text(60, 1), "a"], [long_text(200, 2)], [long_text(10, 3)]]
    windowed = WindowedTexts(tok, spec)
    ids = [window for chunk in windowed.chunks(chunks) for window in chunk]
    flat = [t for chunk in chunks for t in chunk]
    direct = window_token_ids(tok, flat, spec)
    assert ids == direct.input_ids
    assert windowed.text_index.tolist() == direct.text_index.tolist()
    assert windowed.counts.tolist() == direct.counts.tolist() and windowed.cut.tolist() == direct.cut.tolist()
    assert (windowed.tokens == direct.tokens + tok.num_special_tokens_to_add()).all()


# ------------------------------------------------------------------------------------------------ end to end


def test_training_and_predicting_on_windows_report_per_text(tmp_path, sample_dir):
    from test_cli import data_args, fit, trainer_args

    from lightning_cls.cli import main

    windows = ["--data.max_length=16", "--data.max_windows=4", "--data.window_stride=10"]
    fit(tmp_path, sample_dir, "distilbert", *windows)
    ckpt = str(tmp_path / "ckpt" / "last.ckpt")
    cache = next(p for p in (tmp_path / "cache").iterdir() if (p / "test.texts.npy").is_file())
    meta = json.loads((cache / "meta.json").read_text())
    test_texts = np.load(cache / "test.texts.npy")
    assert meta["splits"]["test"]["rows"] == len(test_texts)  # texts, not windows
    assert meta["splits"]["test"]["windows"] == int(test_texts["windows"].sum()) > len(test_texts)
    assert len(meta["splits"]["train"]["window_counts"]) > 1  # the reference records texts by window count
    common = [*data_args(sample_dir, "distilbert"), *trainer_args(tmp_path), *windows, f"--ckpt_path={ckpt}"]
    # test: the metrics and the report count texts, each answered with its windows' mean logits
    main(["test", *common])
    report = json.loads(next((tmp_path / "runs").rglob("test_report.json")).read_text())
    assert report["rows"] == len(test_texts)
    # predict on a file: one row per text, with the windows read and whether the cap cut the text
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join([long_text(300, 5), "short", long_text(6, 6)]) + "\n")
    out = tmp_path / "predictions.jsonl"
    main(["predict", *common, f"--data.predict_path={texts}", f"--prediction_writer.output_path={out}"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2, 3]
    assert [r["windows"] for r in rows][:2] == [4, 1] and [r["truncated"] for r in rows] == [True, False, False]


def test_serving_reads_long_texts_as_windows_batched_across_requests(sample_dir, tmp_path):
    import queue

    from serving_helpers import fabricate_export

    from lightning_cls.export.runtime import InferenceSettings
    from lightning_cls.serving.api import ClassifierAPI

    model_dir = fabricate_export(sample_dir / "wordpiece", tmp_path / "model", max_length=16)
    budget = InferenceSettings(max_batch_tokens=40)  # windows of several texts in one pass, and several passes
    api = ClassifierAPI(str(model_dir), max_batch_size=4, inference=budget, max_windows=6, window_stride=10)
    api.set_logger_queue(queue.Queue())
    api.setup("cpu")
    texts = [long_text(200, 1), "short", long_text(8, 2), long_text(30, 3)]
    requests = [(texts[:2], 2), (texts[2:], 1)]
    batched = api.unbatch(api.predict(api.batch([api.decode_request({"texts": t, "top_k": k}) for t, k in requests])))
    flat = [answer for answers in batched for answer in answers]
    alone = [api.predict(([text], 2))[0] for text in texts]
    champion = api.models.champion
    windows = window_token_ids(champion.model.tokenizer, texts, champion.model.windows)
    assert [a["windows"] for a in flat] == windows.counts.tolist() and flat[0]["windows"] == 6
    assert [a["truncated"] for a in flat] == windows.cut.tolist() and windows.cut[0] and not windows.cut[1:3].any()
    assert windows.counts[2:].max() > 1  # more than one text read as several windows
    for got, want in zip(flat, alone, strict=True):  # the same answer alone as among other texts' windows
        assert got["label"] == want["label"] and got["windows"] == want["windows"]
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-5)
    # the answer is the mean of the windows' logits, each window run as the model would run it alone
    with torch.inference_mode():
        per_window = torch.cat([api.runner.model(input_ids=torch.tensor([ids])).logits for ids in windows.input_ids])
    expected = mean_logits_per_text(per_window, windows.text_index, len(texts)).softmax(-1)
    assert [a["probability"] for a in flat] == pytest.approx(expected.max(-1).values.tolist(), abs=1e-5)
    messages = [api._logger_queue.get_nowait() for _ in range(api._logger_queue.qsize())]
    assert next(m for key, m in messages if key == "batch")["windows"] == windows.counts.tolist()


def test_the_drift_report_compares_windows_per_text_with_the_training_texts():
    from lightning_cls.monitoring.drift import drift_report, window_count_bins

    reference = {"label_counts": {"a": 50, "b": 50}, "window_counts": {"1": 60, "2": 30, "3": 10}}
    live, ref = window_count_bins([1, 2, 9], reference["window_counts"])
    assert ref.tolist() == [60, 30, 10] and live.tolist() == [1, 1, 1]  # above the reference's largest: last bin
    same = [1] * 60 + [2] * 30 + [3] * 10
    longer = [3] * 50 + [8] * 50  # documents got longer: more windows per text
    labels, probs = ["a", "b"] * 50, [0.9] * 100
    steady = drift_report(reference, ["a", "b"], labels, probs, None, windows=same)
    drifted = drift_report(reference, ["a", "b"], labels, probs, None, windows=longer)
    assert steady["window_psi"] == pytest.approx(0.0) and "window_psi" not in steady["alerts"]
    assert drifted["window_psi"] > 1 and "window_psi" in drifted["alerts"]
    # A reference without window counts (a model trained on truncated texts): no window signal, no error.
    plain = drift_report({"label_counts": {"a": 1, "b": 1}}, ["a", "b"], labels, probs, None, windows=longer)
    assert plain["window_psi"] is None
