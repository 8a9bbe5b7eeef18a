"""Property-based tests (hypothesis): the manifest parser, MAP@5 and the key sanitiser, on generated inputs.

Every generated manifest either parses to exactly its rows (keys, order, metadata, URLs) or fails with one
``CatalogueError`` line; MAP@5 agrees with a direct reading of the Kaggle definition and its vectorised threshold
sweep agrees with the per-query loop; no key can become a path outside the output folder.
"""

import posixpath

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from whale_dist import catalog, metrics, storage
from whale_dist.catalog import CatalogueError

SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

# Keys as people write them: spaces, commas, quotes, accents, CJK, emoji, path separators.
key_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=24)
meta_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12)


def write_csv(path, frame: pd.DataFrame, encoding: str = "utf-8") -> str:
    frame.to_csv(path, index=False, encoding=encoding)
    return str(path)


@SETTINGS
@given(keys=st.lists(key_text, min_size=1, max_size=12, unique=True), data=st.data())
def test_manifest_round_trips_every_row(tmp_path_factory, keys, data):
    assume(all(k.strip() for k in keys))
    folder = tmp_path_factory.mktemp("m")
    individuals = data.draw(st.lists(meta_text, min_size=len(keys), max_size=len(keys)))
    encoding = data.draw(st.sampled_from(["utf-8", "utf-8-sig"]))
    frame = pd.DataFrame({"image": keys, "individual_id": individuals, "date": ["2024-01-01"] * len(keys)})
    table = catalog.read_manifest(write_csv(folder / "m.csv", frame, encoding), check=False)
    assert list(table["image_key"]) == keys
    assert list(table["individual_id"]) == individuals
    assert list(table.columns) == list(catalog.CATALOGUE_COLUMNS)
    for key, url in zip(keys, table["url"]):
        if "://" in key or key.startswith("/"):
            assert url == key
        else:
            assert url == storage.join(str(folder), key)


@SETTINGS
@given(keys=st.lists(key_text, min_size=1, max_size=8, unique=True), data=st.data())
def test_duplicate_key_is_one_line_naming_the_row(tmp_path_factory, keys, data):
    assume(all(k.strip() for k in keys))
    position = data.draw(st.integers(0, len(keys)))
    repeated = data.draw(st.sampled_from(keys))
    rows = keys[:position] + [repeated] + keys[position:]
    first_dup = next(i for i, k in enumerate(rows) if k in rows[:i])
    path = write_csv(tmp_path_factory.mktemp("m") / "m.csv", pd.DataFrame({"image": rows}))
    with pytest.raises(CatalogueError) as info:
        catalog.read_manifest(path, check=False)
    message = str(info.value)
    assert f"row {first_dup + 2}: duplicate image key" in message and "\n" not in message.replace(repeated, "")


@SETTINGS
@given(data=st.binary(max_size=400))
def test_arbitrary_bytes_parse_or_fail_in_one_catalogue_error(tmp_path_factory, data):
    """Whatever bytes a manifest holds, the reader returns a table or raises CatalogueError, never anything else."""
    path = tmp_path_factory.mktemp("m") / "m.csv"
    path.write_bytes(data)
    try:
        table = catalog.read_manifest(str(path), check=False)
    except CatalogueError as exc:
        assert str(exc).startswith(f"manifest {path}")
    else:
        assert table["image_key"].is_unique and (table["image_key"].str.strip() != "").all()


@SETTINGS
@given(text=st.text(max_size=60), encoding=st.sampled_from(["utf-16", "latin-1", "cp1252", "utf-32"]))
@example(text=",", encoding="latin-1")  # a row longer than its header: pandas made the key an index (found in CI)
@example(text="0\n1", encoding="latin-1")  # ASCII text of two lines is two rows
def test_non_utf8_manifest_is_refused_or_read_exactly(tmp_path_factory, text, encoding):
    """A manifest in another encoding is refused in one line, unless its bytes happen to be the same UTF-8 text."""
    path = tmp_path_factory.mktemp("m") / "m.csv"
    try:
        raw = f"image\n{text}\n".encode(encoding)
    except UnicodeEncodeError:
        assume(False)
    path.write_bytes(raw)
    try:
        table = catalog.read_manifest(str(path), check=False)
    except CatalogueError as exc:
        try:
            raw.decode("utf-8-sig")
        except UnicodeDecodeError as bad:
            assert str(exc) == f"manifest {path}: not UTF-8 text (byte {bad.start})"
        else:  # valid UTF-8 by accident (ASCII text): refused for its CSV content, still in one line
            assert str(exc).startswith(f"manifest {path}") and "\n" not in str(exc).replace(text, "")
    else:
        assert raw.decode("utf-8-sig").startswith("image")  # it really was valid UTF-8
        assert len(table) <= max(1, len(text.splitlines()))  # a row per line at most (pandas skips blank ones)


labels = st.sampled_from(["a", "b", "c", "d", "e", "f", "g", "new_individual"])
prediction_lists = st.lists(labels, max_size=7)


def reference_ap5(truth: str, prediction: list[str]) -> float:
    """Kaggle's definition, read literally: precision at the first correct rank of the five distinct labels."""
    distinct = list(dict.fromkeys(prediction))[:5]
    return 1.0 / (distinct.index(truth) + 1) if truth in distinct else 0.0


@SETTINGS
@given(st.lists(st.tuples(labels, prediction_lists), min_size=1, max_size=20), st.randoms())
def test_map5_matches_definition_bounds_and_order(pairs, rnd):
    truths, predictions = [t for t, _ in pairs], [p for _, p in pairs]
    score = metrics.map_at_5(truths, predictions)
    assert 0.0 <= score <= 1.0
    assert score == pytest.approx(np.mean([reference_ap5(t, p) for t, p in pairs]))
    shuffled = pairs[:]
    rnd.shuffle(shuffled)
    assert metrics.map_at_5([t for t, _ in shuffled], [p for _, p in shuffled]) == pytest.approx(score)
    assert (score == 1.0) == all(p and p[0] == t for t, p in pairs)


@SETTINGS
@given(labels, prediction_lists, st.data())
def test_repeating_a_label_never_earns_credit(truth, prediction, data):
    assume(prediction)
    repeated = data.draw(st.sampled_from(prediction))
    position = data.draw(st.integers(0, len(prediction)))
    padded = prediction[:position] + [repeated] + prediction[position:]
    first = prediction.index(repeated)
    if position > first:  # a later repeat changes nothing
        assert metrics.average_precision_at_5(truth, padded) == metrics.average_precision_at_5(truth, prediction)
    assert metrics.average_precision_at_5(truth, padded) <= 1.0


@SETTINGS
@given(st.integers(1, 12), st.integers(0, 2**31 - 1), st.lists(st.floats(-1, 1), min_size=1, max_size=6))
def test_threshold_sweep_equals_per_query_loop(n, seed, thresholds):
    """The vectorised sweep is what calibration optimises; it must equal inserting ``new_individual`` query by query,
    including ties between a score and the threshold (scores are drawn from a coarse grid to make ties common)."""
    rng = np.random.default_rng(seed)
    pool = np.array(["a", "b", "c", "d", "e", "f"])
    truths, ids, scores = [], [], np.full((n, 5), -np.inf)
    for row in range(n):
        count = int(rng.integers(0, 6))
        ids.append(list(rng.choice(pool, count, replace=False)))
        scores[row, :count] = np.sort(rng.choice(np.linspace(-1, 1, 9), count))[::-1]
        truths.append(str(rng.choice(np.append(pool, "new_individual"))))
    thresholds = np.array(thresholds + list(np.linspace(-1, 1, 9)))
    curve = metrics.threshold_curve(truths, ids, scores, thresholds)
    for column, threshold in enumerate(thresholds):
        loop = [metrics.insert_new_individual(i, s[:len(i)], threshold) for i, s in zip(ids, scores)]
        assert curve[column] == pytest.approx(metrics.map_at_5(truths, loop))


@SETTINGS
@given(st.text(max_size=40))
def test_sanitised_key_never_leaves_the_output_folder(key):
    safe = storage.safe_relative_path(key)
    root = "/out/prefix"
    joined = posixpath.normpath(posixpath.join(root, safe))
    assert joined.startswith(root + "/")
    assert not safe.startswith("/") and ".." not in safe.split("/")
    assert storage.join(root, safe).startswith(root + "/")
