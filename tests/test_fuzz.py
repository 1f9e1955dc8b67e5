"""Property-based fuzzing (hypothesis) of the config parser and the data path: arbitrary input either loads or
fails with the project's own one-line error (never a traceback from deep inside), and the loader's sharding
holds for any world size, batch shape and example lengths."""

from __future__ import annotations

import json
import math
import string
import types
import typing
from collections import Counter

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mdm_scale.config.loader import all_keys, check_batch_arithmetic, choice_sections, load_config, parse_override
from mdm_scale.config.schema import Config, ConfigError
from mdm_scale.data.dataset import TokenizedData
from mdm_scale.data.loader import TrainLoader
from mdm_scale.data.records import DataError, read_records

SECTIONS = {k.rsplit(".", 1)[0] for k in all_keys() if "." in k}  # every section, nested ones too
LEAF_KEYS = sorted(k for k in all_keys() if k not in SECTIONS)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
words = st.text(string.ascii_lowercase + "_", min_size=1, max_size=10)
keys = st.one_of(st.sampled_from(all_keys()), st.lists(words, min_size=1, max_size=3).map(".".join),
                 st.tuples(st.sampled_from(sorted(SECTIONS)), words).map(".".join))  # unknown key in a section
override_values = st.one_of(json_values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
                            st.text(max_size=20))


def field_hint(key: str):
    """The schema's type annotation of a dotted key (in a choice section: of the first kind that has it)."""
    cls, *parents, name = [Config, *key.split(".")]
    for part in parents:
        cls = typing.get_type_hints(cls)[part]
    kinds = cls.kinds.values() if hasattr(cls, "kinds") else [cls]
    return next(typing.get_type_hints(k)[name] for k in kinds if name in typing.get_type_hints(k))


def values_of(hint) -> st.SearchStrategy:
    """Values of an annotation's type (the range checks may still refuse some)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(st.none() if a is type(None) else values_of(a) for a in args))
    if origin is list:
        return st.lists(values_of(args[0]), max_size=3)
    return {bool: st.booleans(), int: st.integers(-3, 10**6), float: st.floats(-1.0, 1e4),
            str: st.text(string.ascii_letters + "/._-", min_size=1, max_size=12)}.get(hint, st.just({}))


# Valid-looking items: a known key with a value of its type, so that most runs load and the values are checked.
typed_items = st.sampled_from(LEAF_KEYS).flatmap(
    lambda key: values_of(field_hint(key)).map(lambda v: (key, yaml.safe_dump(v, default_flow_style=True)
                                                          .strip().removesuffix("...").strip())))


def one_line_error(err: Exception) -> None:
    text = str(err)
    assert text and "\n" not in text, text


CROSS_CHECKED = [  # the schema's checks of one key against another name either key
    ("variance.t_sampler.low", "variance.t_sampler.high"),
]


def names_one_of(err: ConfigError, keys: list[str]) -> None:
    """The error names (quoted as ``repr`` quotes it) one of ``keys``, a section above one, or a key inside
    one (a mapping value is checked key by key), or says that a ``--set`` item is malformed."""
    text = str(err)
    one_line_error(err)

    def quoted(key: str) -> str:
        return repr(key)[1:-1]

    def named(key: str) -> bool:
        parts = key.split(".")
        whole = [quoted(".".join(parts[:i])) for i in range(1, len(parts) + 1)]
        return any(f"{q}{w}{q}" in text for w in whole for q in "'\"") or any(
            f"{q}{quoted(key)}{sep}" in text for q in "'\"" for sep in ".[")

    keys = keys + [other for k in keys for pair in CROSS_CHECKED if k in pair for other in pair]
    assert any(named(k) for k in keys) or text.startswith("--set expects key=value"), (text, keys)


def dotted(config: Config, key: str):
    node = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def same_value(actual, expected) -> bool:
    """The config holds the value given (ints and numeric strings become floats where floats are expected)."""
    if isinstance(actual, float) and not isinstance(expected, bool):
        try:
            expected = float(expected)
        except (TypeError, ValueError):
            return False
        return actual == expected or (math.isnan(actual) and math.isnan(expected))
    return actual == expected and type(actual) is type(expected)


def last_word(items: list[tuple[str, str]]) -> dict[str, object]:
    """Leaf keys whose value no later item replaces (the same key, a section above it or a key inside it, or the
    ``name`` of the choice section it is in: another kind replaces the section)."""
    final = {}
    for i, (key, text) in enumerate(items):
        later = [k for k, _ in items[i + 1:]]
        later += [k.removesuffix(".name") for k in later if k.removesuffix(".name") in choice_sections()]
        if key in LEAF_KEYS and not any(k == key or key.startswith(k + ".") or k.startswith(key + ".")
                                        for k in later):
            final[key] = parse_override(f"{key}={text}")[1]
    return final


@FUZZ
@given(items=st.lists(st.tuples(keys, override_values) | typed_items, max_size=4), world=st.integers(1, 64))
def test_any_overrides_load_with_their_values_or_fail_naming_a_key(items, world):
    overrides = [f"{key}={value}" for key, value in items]
    try:
        config = load_config([], overrides)
        check_batch_arithmetic(config, world)
    except ConfigError as err:
        names_one_of(err, [key for key, _ in items] + ["train.global_batch_size"])
    else:
        for key, value in last_word(items).items():
            assert same_value(dotted(config, key), value), (key, value, dotted(config, key))


@FUZZ
@given(document=st.dictionaries(st.sampled_from(sorted({k.split(".")[0] for k in all_keys()})) | st.text(max_size=8),
                                json_values, max_size=4))
def test_any_yaml_file_loads_with_its_values_or_fails_naming_a_key(document, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        config = load_config([path])
    except ConfigError as err:
        names_one_of(err, [str(key) for key in document] + ["train.global_batch_size"])
    else:
        for name, body in document.items():  # a file that loads has only known sections and keys
            settings = body.items() if name in SECTIONS else [(None, body)]  # seed, deepspeed: one value
            for key, value in settings:
                where = name if key is None else f"{name}.{key}"
                assert same_value(dotted(config, where), value), (where, value)


def record_is_good(raw: bytes) -> bool:
    """What read_records must accept: a JSON object with string prompt and a non-blank string response."""
    try:
        record = json.loads(raw)
    except ValueError:
        return False
    return (isinstance(record, dict) and isinstance(record.get("prompt"), str)
            and isinstance(record.get("response"), str) and bool(record["response"].strip()))


lines = st.one_of(
    st.fixed_dictionaries({"prompt": st.text(max_size=20), "response": st.text(max_size=20)}).map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=30),
).map(lambda text: text.encode()) | st.binary(max_size=30)


@FUZZ
@given(raw_lines=st.lists(lines.map(lambda b: b.replace(b"\n", b" ")), min_size=1, max_size=12))
def test_any_jsonl_file_reads_or_names_the_first_bad_line(raw_lines, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(raw_lines) + b"\n")
    numbered = [(n, raw) for n, raw in enumerate(raw_lines, start=1) if raw.strip()]
    good = [n for n, raw in numbered if record_is_good(raw)]
    bad = [n for n, raw in numbered if not record_is_good(raw)]
    try:
        records, report = read_records(path, "sft", on_bad="skip")
    except DataError as err:
        one_line_error(err)
        assert not good and "no usable records" in str(err)
    else:
        assert records["line"] == [str(n) for n in good]
        assert report.kept == len(good) and sum(report.skipped.values()) == len(bad)
    if bad:
        with pytest.raises(DataError, match=rf"d.jsonl:{bad[0]}: ") as caught:
            read_records(path, "sft", on_bad="error")
        one_line_error(caught.value)


@FUZZ
@given(lengths=st.lists(st.integers(2, 40), min_size=1, max_size=30), world=st.integers(1, 4),
       micro=st.integers(1, 4), accum=st.integers(1, 3), step=st.integers(0, 20), grouped=st.booleans(),
       seed=st.integers(0, 2**31))
def test_loader_covers_each_stream_position_once_with_its_own_tokens(lengths, world, micro, accum, step, grouped,
                                                                     seed):
    rng = np.random.default_rng(seed)
    pieces = [rng.integers(5, 50, size=n) for n in lengths]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    prompts = np.array([int(rng.integers(0, n - 1)) for n in lengths], dtype=np.int64)
    data = TokenizedData(np.concatenate(pieces).astype(np.int64), offsets, prompts, Counter())
    seen = []
    for rank in range(world):
        loader = TrainLoader(data, seed, rank, world, micro, accum, 0, 8, 64, grouped)
        for m in range(accum):
            batch = loader.micro_batch_at(step, m)
            assert batch.input_ids.shape[0] == micro
            for row, position in enumerate(batch.sample_index.tolist()):
                example = loader.stream.example_ids(range(position, position + 1))[0]
                n = lengths[example]
                assert torch.equal(batch.input_ids[row, :n], torch.from_numpy(pieces[example]))
                assert (batch.input_ids[row, n:] == 0).all()
                assert batch.loss_mask[row].nonzero().flatten().tolist() == list(range(prompts[example], n))
                seen.append(position)
    size = world * micro * accum
    assert sorted(seen) == list(range(step * size, (step + 1) * size))
