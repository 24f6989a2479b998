"""The BBC topic classifier build: caching logic (fast, with a stub trainer) and one real build (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs import bbc, make_classifier


@pytest.fixture
def stub_train(monkeypatch) -> list[Path]:
    """Replace training by writing just ``training_info.json``; returns the directories it trained into."""
    calls: list[Path] = []

    def train(out_dir: Path, articles: list[bbc.Article], fingerprint: str) -> None:
        calls.append(out_dir)
        out_dir.mkdir(parents=True)
        (out_dir / make_classifier.INFO_FILE).write_text(json.dumps({"fingerprint": fingerprint}))

    monkeypatch.setattr(make_classifier, "train", train)
    return calls


def test_default_out_dir_follows_cache_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("ENCODER_BATCH_CACHE", str(tmp_path))
    assert make_classifier.default_out_dir() == tmp_path / "bbc-topic-minilm"


def test_build_is_cached_by_input_fingerprint(tmp_path, stub_train):
    out = tmp_path / "clf"
    assert make_classifier.build_classifier(out) == out
    assert len(stub_train) == 1 and stub_train[0] != out  # trained into a staging dir, then moved
    make_classifier.build_classifier(out)
    assert len(stub_train) == 1
    make_classifier.build_classifier(out, force=True)
    assert len(stub_train) == 2

    (out / make_classifier.INFO_FILE).write_text(json.dumps({"fingerprint": "stale"}))
    make_classifier.build_classifier(out)
    assert len(stub_train) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["clf"]  # no staging dirs left behind


def test_failed_build_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "clf"
    out.mkdir()
    (out / make_classifier.INFO_FILE).write_text(json.dumps({"fingerprint": "old"}))

    def train(out_dir: Path, articles: list[bbc.Article], fingerprint: str) -> None:
        out_dir.mkdir()
        raise make_classifier.AccuracyTooLow("held-out accuracy 0.5 < 0.9")

    monkeypatch.setattr(make_classifier, "train", train)
    with pytest.raises(make_classifier.AccuracyTooLow):
        make_classifier.build_classifier(out)
    assert json.loads((out / make_classifier.INFO_FILE).read_text()) == {"fingerprint": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["clf"]


# ---- the real build: all-MiniLM-L6-v2 on the BBC corpus (about 2 CPU minutes) --------------


@pytest.fixture(scope="module")
def checkpoint(bbc_classifier) -> Path:
    return bbc_classifier


@pytest.fixture(scope="module")
def sample() -> list[bbc.Article]:
    """Every 28th held-out article: 16 of 444, all five topics."""
    return bbc.split(bbc.load_articles())[1][::28]


@pytest.mark.slow
@pytest.mark.timeout(1200)  # whichever test runs first pays for the build; shared CPUs make it slower
class TestRealBuild:
    def test_held_out_accuracy(self, checkpoint):
        info = json.loads((checkpoint / make_classifier.INFO_FILE).read_text())
        assert info["accuracy"] >= make_classifier.MIN_ACCURACY
        assert (info["train_articles"], info["test_articles"]) == (1781, 444)
        assert info["fingerprint"] == make_classifier.inputs_fingerprint(bbc.load_articles())

    def test_checkpoint_is_minilm_plus_trained_classifier(self, checkpoint, sample):
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
        base = AutoModel.from_pretrained(make_classifier.base_model_dir()).eval()
        assert model.config.id2label == dict(enumerate(["business", "entertainment", "politics", "sports", "tech"]))
        for name, weight in base.state_dict().items():
            assert torch.equal(model.bert.state_dict()[name], weight), name

        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        batch = tokenizer([a.decode() for a in sample[:8]], truncation=True, padding=True, return_tensors="pt")
        with torch.inference_mode():
            logits = model(**batch).logits
            reloaded = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
            assert torch.equal(reloaded(**batch).logits, logits)
            assert torch.equal(model.classifier(base(**batch).pooler_output), logits)

    def test_pipeline_agrees_with_direct_forward(self, checkpoint, sample):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

        texts = [a.decode() for a in sample]
        predictions = pipeline("text-classification", model=str(checkpoint))(texts, truncation=True)
        model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
        probs = make_classifier.logits(model, AutoTokenizer.from_pretrained(checkpoint), texts).softmax(-1)

        assert [p["label"] for p in predictions] == [model.config.id2label[i] for i in probs.argmax(-1).tolist()]
        scores = torch.tensor([p["score"] for p in predictions])
        torch.testing.assert_close(scores, probs.max(-1).values, atol=1e-4, rtol=0)

    def test_second_build_is_skipped(self, checkpoint, monkeypatch):
        weights = checkpoint / "model.safetensors"
        written = weights.stat().st_mtime_ns

        def train(*args: object) -> None:
            raise AssertionError("an up-to-date checkpoint was rebuilt")

        monkeypatch.setattr(make_classifier, "train", train)
        assert make_classifier.build_classifier(checkpoint) == checkpoint
        assert weights.stat().st_mtime_ns == written
