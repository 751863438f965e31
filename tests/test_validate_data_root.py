"""`matta validate` on a data root: it finds the split folders and the schema, and refuses unlabelled records.

The data root is what `matta prepare synthetic` writes (schema.yaml, vocabularies/, summary.json and
one folder of shards per split); the expected counts come from reading the shards back with
`read_records`, and the bad records are written with `serialize_example(..., labels=False)`.
"""

import json
import os

import pytest

from matta_tf.data import Schema, decode_example, read_records, serialize_example, write_records
from matta_tf.pipelines.cli import main


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("validate") / "events")
    assert main(["prepare", "synthetic", "--out", root, "--users", "30", "--items", "12", "--events", "240",
                 "--shards", "2"]) == 0
    return root


def _counts(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _shards(root: str) -> dict[str, list[str]]:
    return {split: sorted(os.listdir(os.path.join(root, split)))
            for split in ("train", "validation", "test") if os.path.isdir(os.path.join(root, split))}


def test_a_data_root_is_checked_split_by_split_with_its_own_schema(data_root, capsys):
    capsys.readouterr()
    shards = _shards(data_root)
    assert set(shards) == {"train", "validation", "test"} and all(len(files) == 2 for files in shards.values())
    total = sum(len(list(read_records(os.path.join(data_root, split)))) for split in shards)
    for target in (data_root, data_root + os.sep):
        assert main(["validate", target]) == 0  # no --schema: the root's schema.yaml
        assert _counts(capsys.readouterr().out) == {"files": 6, "checked": total, "invalid": 0}
    train = len(list(read_records(os.path.join(data_root, "train"))))
    assert main(["validate", os.path.join(data_root, "train")]) == 0  # a split folder: the schema above it
    assert _counts(capsys.readouterr().out) == {"files": 2, "checked": train, "invalid": 0}


def test_records_that_lack_their_label_are_refused(data_root, tmp_path, capsys):
    schema = Schema.load(data_root)
    assert [label.name for label in schema.labels] == ["label"]
    root = tmp_path / "root"
    schema.save(str(root))
    events = [decode_example(record, schema) for record in read_records(os.path.join(data_root, "test"))][:5]
    unlabelled = [serialize_example(event, schema, labels=False) for event in events[:2]]
    write_records([serialize_example(event, schema) for event in events], str(root / "train" / "part"))
    write_records([serialize_example(events[0], schema), *unlabelled], str(root / "test" / "part"))
    capsys.readouterr()
    assert main(["validate", str(root)]) == 1
    out = capsys.readouterr().out
    test_file = str(root / "test" / os.listdir(root / "test")[0])
    assert f"{test_file}: record 1: missing label 'label'" in out
    assert f"{test_file}: record 2: missing label 'label'" in out
    assert "record 0" not in out and str(root / "train") not in out  # the labelled split is clean
    assert _counts(out) == {"files": 2, "checked": 8, "invalid": 2}
    # Events waiting for the Teacher's labels may be checked without them.
    assert main(["validate", str(root), "--allow-missing-labels"]) == 0
    assert _counts(capsys.readouterr().out) == {"files": 2, "checked": 8, "invalid": 0}


def test_a_folder_without_records_or_splits_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["validate", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no TFRecord files match" in err and "Traceback" not in err
