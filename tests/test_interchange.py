"""The FiftyOne and Label Studio exports (rare_jax/infra/interchange.py), checked against each
tool's documentation (quoted or paraphrased next to each check, with the page's address).
Neither package is installed here (too heavy); the files are read back with json / ElementTree.
"""

import ast
import json
import os
import re
import urllib.parse
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from rare_jax.infra import interchange

# Category names as people type them: quotes, markup, ampersands, new lines, a Label Studio
# variable, non-Latin text, and a name that ends like another's "yes"/"no" class.
HOSTILE = ['cat "tabby" <b>&amp;', "dog\nwith 'new' line", "$image", "猫 & 犬", "cat: yes"]
# Two categories for most checks; image b is yes for both (multilabel), c sits exactly on the
# first threshold, a just below it.
CATEGORIES = [HOSTILE[0], HOSTILE[1]]
THRESHOLDS = [0.5, 0.25]
FILES = ["b b&#+%.jpg", "a.png", "sub/c\né.jpg"]  # relative to the base folder
SCORES = np.array([[0.9, 0.3], [0.49999, 0.1], [0.5, 0.2]], np.float32)
LOGITS = np.log(SCORES / (1 - SCORES))
HUMAN = [[1, -1], ["no", "yes"], [None, None]]  # b: yes to the first; a: no, yes; c: none


def _table(tmp_path, **overrides):
  kwargs = dict(
    categories=CATEGORIES,
    paths=FILES,
    scores=SCORES,
    base=str(tmp_path / "images"),
    logits=LOGITS,
    human=HUMAN,
    threshold=THRESHOLDS,
  )
  kwargs.update(overrides)
  return interchange.table(**kwargs)


def _full(tmp_path, relative):
  return os.path.join(str(tmp_path / "images"), *relative.split("/"))


# --- FiftyOne ------------------------------------------------------------------------------
# https://docs.voxel51.com/user_guide/dataset_creation/datasets.html#fiftyoneimageclassificationdataset
# labels.json: {"classes": [...], "labels": {"<uuid>": <target>}}; "If the classes field is
# provided, the target values are class IDs that are mapped to class label strings via
# classes[target]"; a target may be {"label": <target>, "confidence": <optional-confidence>,
# "attributes": {<optional-name>: <optional-value>}}; "You can also load multilabel
# classifications in this format by storing lists of targets"; "The UUIDs ... can be absolute
# paths, in which case the images may or may not be in data/" ("If the UUIDs in your labels are
# absolute paths to the source media, then you can omit the data_path parameter").
FIFTYONE_TARGET_KEYS = {"label", "confidence", "attributes"}


def _check_fiftyone_file(document, images):
  assert set(document) == {"classes", "labels"}
  classes = document["classes"]
  assert isinstance(classes, list) and all(isinstance(c, str) for c in classes)
  assert len(set(classes)) == len(classes)
  for uuid, targets in document["labels"].items():
    assert os.path.isabs(uuid) and uuid in images  # absolute paths: the images stay put
    assert isinstance(targets, list)  # multilabel: a list of targets
    for target in targets:
      if isinstance(target, int):
        assert 0 <= target < len(classes)
        continue
      assert set(target) <= FIFTYONE_TARGET_KEYS and "label" in target
      assert isinstance(target["label"], int) and 0 <= target["label"] < len(classes)
      assert isinstance(target["confidence"], float) and 0 <= target["confidence"] <= 1
      for name, value in target["attributes"].items():
        assert isinstance(name, str) and isinstance(value, (int, float, str, bool))


def test_fiftyone_files_follow_the_documented_format(tmp_path):
  data = _table(tmp_path)
  written = interchange.write_fiftyone(tmp_path / "out", data)
  labels_path, human_path = written.files
  with open(labels_path, encoding="utf-8") as f:
    labels = json.load(f)
  with open(human_path, encoding="utf-8") as f:
    human = json.load(f)
  images = {_full(tmp_path, r) for r in FILES}
  _check_fiftyone_file(labels, images)
  _check_fiftyone_file(human, images)
  a, b, c = (_full(tmp_path, r) for r in ("a.png", "b b&#+%.jpg", "sub/c\né.jpg"))
  assert labels["classes"] == CATEGORIES  # hostile names come back exactly
  assert set(labels["labels"]) == images  # every image, each under its own absolute path
  by_class = {i: [t["label"] for t in labels["labels"][i]] for i in images}
  assert by_class == {b: [0, 1], a: [], c: [0]}  # b multilabel; c on the threshold; a below
  first = labels["labels"][b][0]
  assert first["confidence"] == pytest.approx(0.9)
  assert first["attributes"]["threshold"] == 0.5
  assert first["attributes"]["logit"] == pytest.approx(np.log(9), rel=1e-5)
  # The people's answers: "NAME: yes" / "NAME: no" classes; only answered images.
  assert human["classes"] == [f"{n}: {a_}" for n in CATEGORIES for a_ in ("yes", "no")]
  assert human["labels"] == {b: [0], a: [1, 2]}
  assert written.left_out == ()


def test_fiftyone_import_code_names_the_files_even_in_a_hostile_folder(tmp_path):
  out = tmp_path / "out 'quoted\" dir"
  written = interchange.write_fiftyone(out, _table(tmp_path))
  tree = ast.parse(written.how_to_import)  # valid Python whatever the folder's name
  calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and n.keywords]
  paths = [k.value.value for call in calls for k in call.keywords if k.arg == "labels_path"]
  assert paths == list(written.files)
  assert "fo.types.FiftyOneImageClassificationDataset" in written.how_to_import
  assert "merge_dir" in written.how_to_import


def test_fiftyone_human_classes_stay_distinct_for_names_that_look_alike():
  names = ["cat", "cat: yes", "cat: no", "cat: yes: no"]
  classes = interchange.human_classes(names)
  assert len(set(classes)) == len(classes) == 2 * len(names)


# --- Label Studio --------------------------------------------------------------------------
# https://labelstud.io/guide/tasks#Basic-Label-Studio-JSON-format: a JSON list of tasks; "The
#   data key ... references each task"; its keys are the source keys of the object tags
#   (<Image value="$key">: "a valid URL to an image file"); optional "annotations" and
#   "predictions".
# https://labelstud.io/guide/predictions: predictions[].model_version (string), .score
#   ("applies to the entire prediction"), .result[] with id, from_name and to_name ("Must
#   match the labeling configuration"), type and value; a choices result is
#   {"type": "choices", "value": {"choices": [...]}}.
# https://labelstud.io/tags/choices: Choices name, toName, choice (single | single-radio |
#   multiple); <Choice value=...>.
# https://labelstud.io/guide/storage_local#Tasks-with-local-storage-file-references: files as
#   "/data/local-files/?d=path/file", the path relative to LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT.
RESULT_KEYS = {"id", "from_name", "to_name", "type", "value"}


def _config_parts(xml_text):
  view = ET.fromstring(xml_text)
  assert view.tag == "View"
  images = {e.get("name"): e.get("value") for e in view.iter("Image")}
  choices = {
    e.get("name"): (e.get("toName"), e.get("choice"), [c.get("value") for c in e.iter("Choice")])
    for e in view.iter("Choices")
  }
  variables = set()
  for element in view.iter():
    for value in element.attrib.values():
      variables.update(re.findall(r"\$(\w+)", value))
  return images, choices, variables


def _check_task(task, images, choices, variables):
  assert set(task) <= {"data", "predictions", "annotations"}
  assert variables <= set(task["data"])  # every $variable of the configuration is in data
  for kind in ("predictions", "annotations"):
    for item in task.get(kind, []):
      if kind == "predictions":
        assert isinstance(item["model_version"], str) and item["model_version"]
        assert isinstance(item["score"], float) and 0 <= item["score"] <= 1
      ids = [r["id"] for r in item["result"]]
      assert len(set(ids)) == len(ids)
      for result in item["result"]:
        assert set(result) == RESULT_KEYS and result["type"] == "choices"
        to_name, mode, values = choices[result["from_name"]]  # matches the configuration
        assert result["to_name"] == to_name and to_name in images
        picked = result["value"]["choices"]
        assert set(result["value"]) == {"choices"} and set(picked) <= set(values)
        assert mode == "multiple" or len(picked) == 1


def test_label_studio_files_follow_the_documented_format(tmp_path):
  data = _table(tmp_path)
  written = interchange.write_label_studio(tmp_path / "out", data, model_version="round 3")
  config_path, tasks_path = written.files
  with open(config_path, encoding="utf-8") as f:
    images, choices, variables = _config_parts(f.read())
  with open(tasks_path, encoding="utf-8") as f:
    tasks = json.load(f)
  assert images == {"image": "$image"}
  assert choices == {
    "category_1": ("image", "single-radio", ["yes", "no"]),
    "category_2": ("image", "single-radio", ["yes", "no"]),
  }
  assert variables == {"image", "name_1", "name_2"}
  assert isinstance(tasks, list) and len(tasks) == 3
  for task in tasks:
    _check_task(task, images, choices, variables)
  root = str(tmp_path / "images")
  by_path = {t["data"]["path"]: t for t in tasks}
  assert [t["data"]["path"] for t in tasks] == sorted(by_path)  # deterministic order
  for relative in FILES:
    task = by_path[_full(tmp_path, relative)]
    url = task["data"]["image"]
    assert url.startswith("/data/local-files/?d=")
    # The path comes back exactly as Label Studio's server reads it (request.GET["d"]).
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["d"] == [relative]
    assert [task["data"]["name_1"], task["data"]["name_2"]] == CATEGORIES
  b = by_path[_full(tmp_path, "b b&#+%.jpg")]
  decisions = [r["value"]["choices"] for r in b["predictions"][0]["result"]]
  assert decisions == [["yes"], ["yes"]]  # both categories: multilabel
  assert b["predictions"][0]["score"] == pytest.approx(0.9)  # the highest of its scores
  assert b["predictions"][0]["model_version"] == "round 3"
  assert [r["value"]["choices"] for r in b["annotations"][0]["result"]] == [["yes"]]
  assert b["annotations"][0]["result"][0]["from_name"] == "category_1"
  assert b["data"]["score_1"] == pytest.approx(0.9) and "logit_2" in b["data"]
  a = by_path[_full(tmp_path, "a.png")]
  assert [r["value"]["choices"] for r in a["predictions"][0]["result"]] == [["no"], ["no"]]
  assert [r["value"]["choices"] for r in a["annotations"][0]["result"]] == [["no"], ["yes"]]
  c = by_path[_full(tmp_path, "sub/c\né.jpg")]
  assert [r["value"]["choices"] for r in c["predictions"][0]["result"]] == [["yes"], ["no"]]
  assert "annotations" not in c  # nobody answered
  assert root in written.how_to_import and tasks_path in written.how_to_import


def test_label_studio_other_url_prefix_and_document_root(tmp_path):
  data = _table(tmp_path)
  tasks, root, left_out = interchange.label_studio_tasks(
    data,
    model_version="v",
    document_root=tmp_path / "images" / "sub",
    url_prefix="http://localhost:8081/",
  )
  assert root == str(tmp_path / "images" / "sub")
  assert [t["data"]["image"] for t in tasks] == ["http://localhost:8081/c%0A%C3%A9.jpg"]
  outside = sorted(_full(tmp_path, r) for r in ("a.png", "b b&#+%.jpg"))
  assert [p for p, _ in left_out] == outside
  assert all("outside the Label Studio document root" in why for _, why in left_out)


def test_label_studio_refuses_to_serve_the_whole_disk_by_default(tmp_path):
  data = interchange.table(["x"], ["/one/a.jpg", "/two/b.jpg"], [[0.1], [0.2]])
  with pytest.raises(ValueError, match="no common folder but '/'; pass document_root"):
    interchange.label_studio_tasks(data, model_version="v")
  tasks, root, _ = interchange.label_studio_tasks(data, model_version="v", document_root="/")
  assert root == "/" and tasks[0]["data"]["image"] == "/data/local-files/?d=one/a.jpg"


# --- Shared behaviour ----------------------------------------------------------------------


def test_xml_attribute_escapes_what_a_parser_would_change():
  for value in HOSTILE + ['a"b', "a<b>&c", "tab\there", "cr\rlf\r\n", "&#10;"]:
    element = ET.fromstring(f"<Header value={interchange.xml_attribute(value)}/>")
    assert element.get("value") == value


def test_hostile_names_round_trip_through_both_formats(tmp_path):
  data = interchange.table(HOSTILE, ["/data/x.jpg"], [[0.7] * len(HOSTILE)])
  interchange.write_fiftyone(tmp_path / "fo", data)
  interchange.write_label_studio(tmp_path / "ls", data, model_version='m "1"\n<&>')
  with open(tmp_path / "fo" / "labels.json", encoding="utf-8") as f:
    assert json.load(f)["classes"] == HOSTILE
  with open(tmp_path / "ls" / "tasks.json", encoding="utf-8") as f:
    (task,) = json.load(f)
  assert [task["data"][f"name_{k}"] for k in range(1, 6)] == HOSTILE
  assert task["predictions"][0]["model_version"] == 'm "1"\n<&>'
  config = (tmp_path / "ls" / "label_config.xml").read_text(encoding="utf-8")
  assert "tabby" not in config  # names reach Label Studio only as task data ($name_k)


def test_threshold_boundary_is_yes_and_one_threshold_serves_every_category(tmp_path):
  data = interchange.table(["p", "q"], ["/i/a.jpg"], [[0.5, np.nextafter(0.5, 0)]])
  assert data.thresholds == (0.5, 0.5)
  assert [data.decided_yes(0, c) for c in range(2)] == [True, False]


def test_writes_are_deterministic_and_leave_no_temporary_files(tmp_path):
  out = tmp_path / "out"
  first = {}
  for _ in range(2):
    interchange.write_fiftyone(out, _table(tmp_path))
    interchange.write_label_studio(out, _table(tmp_path), model_version="v")
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    first = first or files
    assert files == first
  assert sorted(first) == ["human_labels.json", "label_config.xml", "labels.json", "tasks.json"]
  # Input order does not matter: rows are sorted by path.
  order = [2, 0, 1]
  shuffled = _table(
    tmp_path,
    paths=[FILES[i] for i in order],
    scores=SCORES[order],
    logits=LOGITS[order],
    human=[HUMAN[i] for i in order],
  )
  interchange.write_fiftyone(out, shuffled)
  assert (out / "labels.json").read_bytes() == first["labels.json"]


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
  out = tmp_path / "out"
  interchange.write_fiftyone(out, _table(tmp_path))
  before = (out / "labels.json").read_bytes()

  def no_rename(src, dst):
    raise OSError("disk full")

  monkeypatch.setattr(interchange.os, "replace", no_rename)
  with pytest.raises(OSError, match="disk full"):
    interchange.write_fiftyone(out, _table(tmp_path, threshold=0.1))
  assert (out / "labels.json").read_bytes() == before
  assert sorted(p.name for p in out.iterdir()) == ["human_labels.json", "labels.json"]


def test_names_that_are_not_utf8_are_left_out_and_named(tmp_path):
  bad = os.fsdecode(b"/data/caf\xe9.jpg")  # a Latin-1 file name, as Python lists it
  data = interchange.table(["x"], ["/data/ok.jpg", bad], [[0.9], [0.9]])
  assert data.paths == ("/data/ok.jpg",)
  ((shown, why),) = data.left_out
  assert shown == "/data/caf\\xe9.jpg" and "not valid UTF-8" in why
  written = interchange.write_fiftyone(tmp_path / "fo", data)
  assert written.left_out == data.left_out
  written = interchange.write_label_studio(tmp_path / "ls", data, model_version="v")
  assert written.left_out == data.left_out


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(categories=["a", ""]), "category name '' is blank"),
    (dict(categories=["a", " \n"]), "category name ' \\\\n' is blank"),
    (dict(categories=["a", "a"]), r"category names \['a'\] appear more than once"),
    (dict(categories=["a", 3]), "category name 3 is a int; expected text"),
    (dict(categories="ab"), "is one string; expected a list of names"),
    (dict(categories=[]), "expected at least one category name"),
    (dict(base=None), "is relative and no base folder was given"),
    (dict(paths=["a.png", "./a.png", "x.jpg"]), "is given twice"),
    (dict(scores=SCORES[:2]), "scores has 2 rows for 3 images"),
    (dict(scores=SCORES[:, :1]), "1 values for 2 categories"),
    (dict(scores=SCORES + 0.6), r"expected a probability in \[0, 1\]"),
    (dict(scores=SCORES * np.nan), r"is (np.float32\()?nan\)?; expected a probability"),
    (dict(logits=np.full_like(LOGITS, np.inf)), "expected a finite number"),
    (dict(threshold=1.5), r"threshold for category .* is 1.5; expected a probability"),
    (dict(threshold=[0.5]), "1 thresholds for 2 categories"),
    (
      dict(human=[[2, None], [None, None], [None, None]]),
      "answer of .* is 2; expected 'yes', 'no' or None",
    ),
    (dict(human=[["Yes", None], [None, None], [None, None]]), "for category .* is 'Yes'; expected"),
    (dict(human=[[True, None], [None, None], [None, None]]), "is True; expected 'yes'"),
    (dict(paths=[b"a.png", "b", "c"]), "expected a non-empty path as text"),
  ],
)
def test_bad_input_is_refused_with_the_value_named(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    _table(tmp_path, **overrides)


def test_bad_export_settings_are_refused(tmp_path):
  data = _table(tmp_path)
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="is a file; expected a folder"):
    interchange.write_fiftyone(tmp_path / "file", data)
  with pytest.raises(ValueError, match="model_version='  '; expected a non-empty"):
    interchange.write_label_studio(tmp_path / "ls", data, model_version="  ")
  with pytest.raises(ValueError, match="url_prefix=''"):
    interchange.write_label_studio(tmp_path / "ls", data, model_version="v", url_prefix="")
  assert not (tmp_path / "ls").exists()  # refused before anything was written


def test_label_studio_splits_tasks_within_its_import_limits(tmp_path, monkeypatch):
  # https://labelstud.io/guide/tasks: "You can import files containing up to 250,000 tasks or
  # up to 50MB in size".
  data = _table(tmp_path)
  tasks, _, _ = interchange.label_studio_tasks(data, model_version="v")
  sizes = [len(json.dumps(t, ensure_ascii=False).encode()) for t in tasks]
  limits = [(2, 10**9, 2), (10, max(sizes) + 10, 3), (1, 1, 3), (10, 10**9, 1)]
  for max_tasks, max_bytes, count in limits:
    parts = interchange.label_studio_parts(tasks, max_tasks=max_tasks, max_bytes=max_bytes)
    loaded = [json.loads(part) for part in parts]
    assert len(parts) == count
    assert [t for part in loaded for t in part] == tasks  # every task once, in order
    assert all(len(part) <= max_tasks for part in loaded)
    for text, part in zip(parts, loaded, strict=True):
      assert len(text.encode()) <= max_bytes or len(part) == 1  # a lone task may be larger
  out = tmp_path / "out"
  (out / "tasks-1-of-5.json").parent.mkdir()
  (out / "tasks-1-of-5.json").write_text("[]")  # left by an earlier, larger export
  (out / "notes.json").write_text("{}")  # not ours: kept
  monkeypatch.setattr(interchange, "LABEL_STUDIO_MAX_TASKS", 2)
  written = interchange.write_label_studio(out, data, model_version="v")
  names = [os.path.basename(f) for f in written.files]
  assert names == ["label_config.xml", "tasks-1-of-2.json", "tasks-2-of-2.json"]
  assert sorted(p.name for p in out.iterdir()) == sorted(names + ["notes.json"])
  assert all(f in written.how_to_import for f in written.files[1:])
  monkeypatch.setattr(interchange, "LABEL_STUDIO_MAX_TASKS", 250_000)
  written = interchange.write_label_studio(out, data, model_version="v")
  assert sorted(p.name for p in out.iterdir()) == ["label_config.xml", "notes.json", "tasks.json"]
