"""Exports that FiftyOne and Label Studio import, in their documented classification formats.

Plumbing (the standard library and infra.csvfile only): scores of images for one or more
categories, each an independent yes/no classifier (an image may be "yes" for several), and the
answers people gave. Build the input once with `table(...)` (every name, path, score,
threshold and answer checked), then write it with `write_fiftyone(out_dir, table)` or
`write_label_studio(out_dir, table, model_version=...)`. Each returns a `Written`: the files,
the images left out with the reason, and `how_to_import` (the code or steps for the user).

A category is "yes" for an image when its score (a probability) is >= the category's
threshold. Each file is written atomically (a temporary file renamed over the old one: a
reader sees the old file or the new one) and deterministically: images in path order, one per
line, categories in the given order, JSON keys sorted, so the same input gives the same bytes.
Images whose file name is not valid UTF-8 are left out (both tools keep file names as UTF-8
text) and listed in `Written.left_out`.

FiftyOne: FiftyOneImageClassificationDataset
--------------------------------------------
Documentation (import):
https://docs.voxel51.com/user_guide/dataset_creation/datasets.html#fiftyoneimageclassificationdataset
(source: voxel51/fiftyone, docs/source/user_guide/dataset_creation/datasets.rst). What it says,
and what is used here:
- `labels.json` is `{"classes": [...], "labels": {"<uuid>": <target>, ...}}`; "If the `classes`
  field is provided, the `target` values are class IDs that are mapped to class label strings
  via `classes[target]`" (class IDs here: the names never appear twice in a file).
- A target may be a dict `{"label": <target>, "confidence": <optional-confidence>,
  "attributes": {<optional-name>: <optional-value>}}`, and multilabel classifications are
  "lists of targets" (a FiftyOne Classifications field).
- The UUIDs "can be absolute paths, in which case the images may or may not be in `data/`",
  and "If the UUIDs in your labels are absolute paths to the source media, then you can omit
  the `data_path` parameter": the keys here are the images' absolute paths, so the images stay
  where they are (nothing is copied).

OUT_DIR/labels.json: the model's decisions. Per image, the list of the categories decided
"yes", each `{"label": class id, "confidence": score, "attributes": {"threshold": t,
"logit": l (when logits are given)}}`; `[]` where no category is.
OUT_DIR/human_labels.json: the answers people gave, in the same format: classes
`"NAME: yes"` and `"NAME: no"` for each category (distinct, since the names are distinct and
the two end differently), and per answered image the list of its answers' class ids. Kept
apart from the decisions, so that both can be seen side by side.

Import (`Dataset.merge_dir` merges labels into the samples with the same file path:
https://docs.voxel51.com/api/fiftyone.core.dataset.html#fiftyone.core.dataset.Dataset.merge_dir)::

    import fiftyone as fo

    dataset = fo.Dataset.from_dir(
        dataset_type=fo.types.FiftyOneImageClassificationDataset,
        labels_path="OUT_DIR/labels.json",
        label_field="predictions",
    )
    dataset.merge_dir(
        dataset_type=fo.types.FiftyOneImageClassificationDataset,
        labels_path="OUT_DIR/human_labels.json",
        label_field="human",
    )
    session = fo.launch_app(dataset)

Label Studio: tasks with predictions and annotations, and the labeling configuration
------------------------------------------------------------------------------------
Documentation:
- Tasks, https://labelstud.io/guide/tasks#Basic-Label-Studio-JSON-format: a JSON list of tasks;
  "The `data` key ... references each task"; its keys are "the source key expected by the
  object tag" (`<Image value="$image">`: "a valid URL to an image file") and may include other
  fields; optional `annotations` ("allows you to import annotation results") and `predictions`.
  "You can import files containing up to 250,000 tasks or up to 50MB in size".
- Predictions, https://labelstud.io/guide/predictions: `predictions[].model_version`,
  `.score` ("The prediction score applies to the entire prediction"), `.result[]` with `id`,
  `from_name` and `to_name` ("Must match the labeling configuration"), `type` and `value`; a
  Choices result is `{"type": "choices", "value": {"choices": [...]}}`.
- Choices, https://labelstud.io/tags/choices: `name`, `toName`, `choice` (`single`,
  `single-radio` or `multiple`), `showInline`; `<Choice value=...>`.
- Variables, https://labelstud.io/guide/tasks#How-to-retrieve-data: "The `value` parameter can
  be a text containing variables prefixed by $" (e.g. `<Header value="url: $image"/>`).
- Local files, https://labelstud.io/guide/storage_local#Tasks-with-local-storage-file-references:
  with `LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true` and
  `LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT` a parent folder of the files, tasks refer to a file
  as `/data/local-files/?d=path/file`, the path relative to that root, and a Local Files source
  storage on that folder (import method "Tasks", not synced) gives the project access.

OUT_DIR/label_config.xml: one `<Image name="image" value="$image"/>` and, per category k
(1, 2, ...), `<Header value="$name_k"/>` and `<Choices name="category_k" toName="image"
choice="single-radio">` with the choices `yes` and `no`: each category is its own yes/no
question, so an answer about one category says nothing about the others (people answer only
some categories of an image). The category names come from the task data (`$name_k`), so a
name is never parsed as XML nor as a `$variable` of the configuration.
OUT_DIR/tasks.json (or tasks-1-of-N.json ... when one file would pass the limits above): per
image (path order) `{"data": {"image": URL, "path": absolute path,
"name_k": name, "score_k": probability, "logit_k": logit (when given)}, "predictions":
[{"model_version", "score": the highest probability among the categories (sort the Data
Manager by it), "result": one choices result per category, "yes" or "no"}], "annotations":
[{"result": one choices result per category answered}] (only where an answer was given)}`.
The `score_k` fields are Data Manager columns, to sort or filter by one category's score.

Import (the steps are in `Written.how_to_import`, with the paths filled in): start Label
Studio with local file serving rooted at the images' folder, paste label_config.xml as the
project's labeling interface (Settings > Labeling Interface > Code), add that folder as Local
Files source storage (import method "Tasks", Save without Sync), then import tasks.json from
the Data Manager.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import shlex
import urllib.parse
from collections.abc import Sequence
from typing import Any

from rare_jax.infra import atomic, csvfile

YES, NO = "yes", "no"
FIFTYONE_LABELS = "labels.json"
FIFTYONE_HUMAN_LABELS = "human_labels.json"
LABEL_STUDIO_TASKS = "tasks.json"
LABEL_STUDIO_CONFIG = "label_config.xml"
LOCAL_FILES_PREFIX = "/data/local-files/?d="
LABEL_STUDIO_IMAGE = "image"  # the Image tag's name and the task data key it reads
# Label Studio's documented limits of one import file.
LABEL_STUDIO_MAX_TASKS = 250_000
LABEL_STUDIO_MAX_BYTES = 50_000_000
_TASK_FILE = re.compile(r"tasks(-[0-9]+-of-[0-9]+)?\.json")
NOT_UTF8 = (
  "its name is not valid UTF-8 (FiftyOne and Label Studio keep file names as UTF-8 text); "
  "rename the file to include it"
)


@dataclasses.dataclass(frozen=True)
class Table:
  """Checked scores of images for categories; build it with `table`.

  paths: absolute, normalised, sorted. scores[i][c]: image i's probability for category c;
  logits likewise (or None); human[i][c]: "yes", "no" or None (not asked), or None for no
  answers at all. left_out: (path, reason) of the images that no export can name.
  """

  categories: tuple[str, ...]
  thresholds: tuple[float, ...]
  paths: tuple[str, ...]
  scores: tuple[tuple[float, ...], ...]
  logits: tuple[tuple[float, ...], ...] | None
  human: tuple[tuple[str | None, ...], ...] | None
  left_out: tuple[tuple[str, str], ...]

  def decided_yes(self, image: int, category: int) -> bool:
    """Whether the model says "yes": score >= the category's threshold."""
    return self.scores[image][category] >= self.thresholds[category]


@dataclasses.dataclass(frozen=True)
class Written:
  """What an export wrote: files (absolute paths), left_out ((printable path, reason) of the
  images not in it), how_to_import (plain steps or code for the user, paths filled in)."""

  files: tuple[str, ...]
  left_out: tuple[tuple[str, str], ...]
  how_to_import: str


def table(
  categories: Sequence[str],
  paths: Sequence[str | os.PathLike],
  scores: Sequence[Sequence[float]],
  *,
  base: str | os.PathLike | None = None,
  logits: Sequence[Sequence[float]] | None = None,
  human: Sequence[Sequence[Any]] | None = None,
  threshold: float | Sequence[float] = 0.5,
) -> Table:
  """Checks and normalises what the exports take.

  Args:
    categories: the category names (user text: any characters), distinct and not blank.
    paths: one per image: absolute, or relative to `base`.
    scores: [image][category] probabilities in [0, 1] (a NumPy [n, C] array works).
    base: the folder relative paths are relative to.
    logits: [image][category] finite numbers, or None.
    human: [image][category] answers: "yes" / 1, "no" / 0, or None / -1 (not asked); or None.
    threshold: one probability for every category, or one per category.

  Raises:
    ValueError: naming the bad value and what was expected: a blank, repeated or non-text
      category name; a relative path without `base`; an image given twice; rows that do not
      match the paths or the categories; a score, logit, threshold or answer out of range.
  """
  names = _category_names(categories)
  thresholds = _thresholds(threshold, names)
  paths = list(paths)
  rows = _rows("scores", scores, len(paths))
  logit_rows = None if logits is None else _rows("logits", logits, len(paths))
  human_rows = None if human is None else _rows("human", human, len(paths))
  base_dir = None
  if base is not None:
    base_dir = os.path.abspath(_text_path(base, "base"))
  entries, seen, left_out = [], {}, []
  for i, raw in enumerate(paths):
    given = _text_path(raw, "path")
    if not os.path.isabs(given) and base_dir is None:
      raise ValueError(
        f"path {given!r} is relative and no base folder was given; expected an absolute path "
        "or base=FOLDER"
      )
    full = os.path.normpath(os.path.join(base_dir or "", given))
    if full in seen:
      raise ValueError(
        f"image {full!r} is given twice (as {seen[full]!r} and {given!r}); expected each image once"
      )
    seen[full] = given
    score = _numbers(rows[i], names, "score", full, probability=True)
    logit = None if logit_rows is None else _numbers(logit_rows[i], names, "logit", full)
    answers = None if human_rows is None else _answers(human_rows[i], names, full)
    if not _is_utf8(full):
      left_out.append((csvfile.printable(full), NOT_UTF8))
      continue
    entries.append((full, score, logit, answers))
  entries.sort(key=lambda entry: entry[0])
  return Table(
    categories=names,
    thresholds=thresholds,
    paths=tuple(e[0] for e in entries),
    scores=tuple(e[1] for e in entries),
    logits=None if logit_rows is None else tuple(e[2] for e in entries),
    human=None if human_rows is None else tuple(e[3] for e in entries),
    left_out=tuple(sorted(left_out)),
  )


def fiftyone_documents(data: Table) -> tuple[dict, dict]:
  """(labels.json, human_labels.json) of `data` as JSON-able dicts (see the module docstring)."""
  labels = {}
  for i, path in enumerate(data.paths):
    targets = []
    for c in range(len(data.categories)):
      if data.decided_yes(i, c):
        attributes = {"threshold": data.thresholds[c]}
        if data.logits is not None:
          attributes["logit"] = data.logits[i][c]
        targets.append({"label": c, "confidence": data.scores[i][c], "attributes": attributes})
    labels[path] = targets
  human = {}
  for i, path in enumerate(data.paths if data.human is not None else ()):
    answered = [2 * c + (0 if a == YES else 1) for c, a in enumerate(data.human[i]) if a]
    if answered:
      human[path] = answered
  return (
    {"classes": list(data.categories), "labels": labels},
    {"classes": human_classes(data.categories), "labels": human},
  )


def human_classes(categories: Sequence[str]) -> list[str]:
  """The classes of human_labels.json: "NAME: yes" (id 2c) and "NAME: no" (id 2c + 1)."""
  return [f"{name}: {answer}" for name in categories for answer in (YES, NO)]


def fiftyone_json(document: dict) -> str:
  """A labels.json document as JSON text: one image per line (the key order of `json.dumps`
  with sort_keys: "classes", then "labels" by path)."""
  lines = ["{" + _dumps("classes") + ": " + _dumps(document["classes"]) + ","]
  lines.append(_dumps("labels") + ": {")
  items = sorted(document["labels"].items())
  lines += [
    f"{_dumps(k)}: {_dumps(v)}" + ("," if n < len(items) else "")
    for n, (k, v) in enumerate(items, 1)
  ]
  lines.append("}}")
  return "\n".join(lines) + "\n"


def write_fiftyone(out_dir: str | os.PathLike, data: Table) -> Written:
  """Writes OUT_DIR/labels.json and OUT_DIR/human_labels.json (see the module docstring).

  Raises:
    ValueError: `out_dir` is a file.
    OSError: a failed write (each file is then its previous version or the new one).
  """
  out_dir = _prepare_dir(out_dir)
  predictions, human = fiftyone_documents(data)
  labels_path = os.path.join(out_dir, FIFTYONE_LABELS)
  human_path = os.path.join(out_dir, FIFTYONE_HUMAN_LABELS)
  _write_atomic(human_path, fiftyone_json(human))
  _write_atomic(labels_path, fiftyone_json(predictions))
  how = "\n".join(
    [
      "import fiftyone as fo",
      "",
      "dataset = fo.Dataset.from_dir(",
      "  dataset_type=fo.types.FiftyOneImageClassificationDataset,",
      f"  labels_path={labels_path!r},",
      '  label_field="predictions",',
      ")",
      "dataset.merge_dir(",
      "  dataset_type=fo.types.FiftyOneImageClassificationDataset,",
      f"  labels_path={human_path!r},",
      '  label_field="human",',
      ")",
      "session = fo.launch_app(dataset)",
    ]
  )
  return Written(files=(labels_path, human_path), left_out=data.left_out, how_to_import=how)


def label_studio_config(num_categories: int) -> str:
  """The labeling configuration (XML) that the tasks of `label_studio_tasks` refer to."""
  if num_categories < 1:
    raise ValueError(f"num_categories={num_categories}; expected at least 1")
  lines = ["<View>", f'  <Image name={xml_attribute(LABEL_STUDIO_IMAGE)} value="$image"/>']
  for k in range(1, num_categories + 1):
    lines += [
      f"  <Header value={xml_attribute(f'${_name_key(k)}')}/>",
      f"  <Choices name={xml_attribute(_control(k))} toName={xml_attribute(LABEL_STUDIO_IMAGE)}"
      ' choice="single-radio" showInline="true">',
      f"    <Choice value={xml_attribute(YES)}/>",
      f"    <Choice value={xml_attribute(NO)}/>",
      "  </Choices>",
    ]
  lines.append("</View>")
  return "\n".join(lines) + "\n"


def label_studio_tasks(
  data: Table,
  *,
  model_version: str,
  document_root: str | os.PathLike | None = None,
  url_prefix: str = LOCAL_FILES_PREFIX,
) -> tuple[list[dict], str | None, tuple[tuple[str, str], ...]]:
  """(tasks, the document root used, images left out) of `data`: see the module docstring.

  An image's URL is `url_prefix` + its path relative to `document_root`, percent-encoded
  (`/` kept). `document_root` defaults to the deepest folder holding every image.

  Raises:
    ValueError: an empty `model_version` or `url_prefix`, or images whose only common folder
      is the file system's root (pass document_root= then: serving all files is a risk).
  """
  if not isinstance(model_version, str) or not model_version.strip():
    raise ValueError(f"model_version={model_version!r}; expected a non-empty description")
  if not isinstance(url_prefix, str) or not url_prefix:
    raise ValueError(f"url_prefix={url_prefix!r}; expected e.g. {LOCAL_FILES_PREFIX!r}")
  root = _document_root(data.paths, document_root)
  prefix = root if root is None or root.endswith(os.sep) else root + os.sep
  tasks, left_out = [], list(data.left_out)
  for i, path in enumerate(data.paths):
    if not path.startswith(prefix):
      left_out.append((path, f"it is outside the Label Studio document root {root!r}"))
      continue
    relative = path[len(prefix) :]
    url = url_prefix + urllib.parse.quote(relative.replace(os.sep, "/"), safe="/")
    task_data: dict[str, Any] = {LABEL_STUDIO_IMAGE: url, "path": path}
    predicted, answered = [], []
    for c, name in enumerate(data.categories):
      k = c + 1
      task_data[_name_key(k)] = name
      task_data[f"score_{k}"] = data.scores[i][c]
      if data.logits is not None:
        task_data[f"logit_{k}"] = data.logits[i][c]
      decision = YES if data.decided_yes(i, c) else NO
      predicted.append(_choices_result(f"prediction_{k}", k, decision))
      answer = data.human[i][c] if data.human is not None else None
      if answer:
        answered.append(_choices_result(f"answer_{k}", k, answer))
    task = {
      "data": task_data,
      "predictions": [
        {"model_version": model_version, "score": max(data.scores[i]), "result": predicted}
      ],
    }
    if answered:
      task["annotations"] = [{"result": answered}]
    tasks.append(task)
  return tasks, root, tuple(sorted(left_out))


def write_label_studio(
  out_dir: str | os.PathLike,
  data: Table,
  *,
  model_version: str,
  document_root: str | os.PathLike | None = None,
  url_prefix: str = LOCAL_FILES_PREFIX,
) -> Written:
  """Writes OUT_DIR/label_config.xml and the tasks (see `label_studio_tasks`).

  The tasks go to OUT_DIR/tasks.json, or, beyond what Label Studio imports from one file
  (250,000 tasks or 50 MB), to OUT_DIR/tasks-1-of-N.json ... tasks-N-of-N.json; task files of
  an earlier export that this one did not write again are removed, so the folder holds one
  export. `url_prefix` other than Label Studio's local files (e.g. "http://localhost:8081/"
  for a web server started in `document_root`) puts that before each relative path instead.

  Raises:
    ValueError: as `label_studio_tasks`, or `out_dir` is a file.
    OSError: a failed write (each file is then its previous version or the new one).
  """
  tasks, root, left_out = label_studio_tasks(
    data, model_version=model_version, document_root=document_root, url_prefix=url_prefix
  )
  out_dir = _prepare_dir(out_dir)
  config_path = os.path.join(out_dir, LABEL_STUDIO_CONFIG)
  parts = label_studio_parts(
    tasks, max_tasks=LABEL_STUDIO_MAX_TASKS, max_bytes=LABEL_STUDIO_MAX_BYTES
  )
  if len(parts) == 1:
    names = [LABEL_STUDIO_TASKS]
  else:
    names = [f"tasks-{k}-of-{len(parts)}.json" for k in range(1, len(parts) + 1)]
  task_paths = [os.path.join(out_dir, name) for name in names]
  _write_atomic(config_path, label_studio_config(len(data.categories)))
  for path, text in zip(task_paths, parts, strict=True):
    _write_atomic(path, text)
  for name in sorted(os.listdir(out_dir)):
    stale = os.path.join(out_dir, name)
    if _TASK_FILE.fullmatch(name) and name not in names and os.path.isfile(stale):
      os.remove(stale)  # a task file of an earlier export: importing it would be wrong
  root_text = root if root is not None else "FOLDER"  # no images: any folder will do
  if url_prefix == LOCAL_FILES_PREFIX:
    serve = [
      "1. Start Label Studio serving local files from the images' folder:",
      "     LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true "
      f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={shlex.quote(root_text)} label-studio start",
    ]
    storage = [
      "3. Settings > Cloud Storage > Add Source Storage > Local files: absolute local path "
      f"{root_text}, import method Tasks, no file filter; Save (do not Sync).",
    ]
  else:
    serve = [
      f"1. Serve the folder {root_text} at {url_prefix} (each image is {url_prefix} followed "
      "by its path in that folder), with CORS allowed for Label Studio's address.",
    ]
    storage = []
  steps = serve + [
    "2. Create a project; in Settings > Labeling Interface > Code, paste the contents of "
    f"{config_path}.",
    *storage,
    f"{3 + len(storage)}. In the project's Data Manager, Import "
    + (task_paths[0] if len(task_paths) == 1 else f"each of {', '.join(task_paths)}")
    + ".",
  ]
  return Written(
    files=(config_path, *task_paths), left_out=left_out, how_to_import="\n".join(steps)
  )


def label_studio_parts(
  tasks: list[dict],
  *,
  max_tasks: int = LABEL_STUDIO_MAX_TASKS,
  max_bytes: int = LABEL_STUDIO_MAX_BYTES,
) -> list[str]:
  """`tasks` as JSON lists (one task per line), each within Label Studio's limits of one
  import file (a task larger than `max_bytes` alone would still be a part of its own)."""
  parts, lines, size = [], [], 4
  for task in tasks:
    line = _dumps(task)
    line_size = len(line.encode("utf-8")) + 2
    if lines and (len(lines) == max_tasks or size + line_size > max_bytes):
      parts.append(lines)
      lines, size = [], 4
    lines.append(line)
    size += line_size
  parts.append(lines)
  return ["[\n" + ",\n".join(lines) + "\n]\n" for lines in parts]


def xml_attribute(value: str) -> str:
  """`value` as a double-quoted XML attribute: `&`, `<`, `>`, `"` and the white space that
  parsers would fold to spaces (newline, carriage return, tab) as character references."""
  escaped = (
    value.replace("&", "&amp;")
    .replace("<", "&lt;")
    .replace(">", "&gt;")
    .replace('"', "&quot;")
    .replace("\n", "&#10;")
    .replace("\r", "&#13;")
    .replace("\t", "&#9;")
  )
  return f'"{escaped}"'


def _control(k: int) -> str:
  return f"category_{k}"


def _name_key(k: int) -> str:
  return f"name_{k}"


def _choices_result(result_id: str, k: int, choice: str) -> dict:
  return {
    "id": result_id,
    "from_name": _control(k),
    "to_name": LABEL_STUDIO_IMAGE,
    "type": "choices",
    "value": {"choices": [choice]},
  }


def _document_root(paths: Sequence[str], document_root) -> str | None:
  if document_root is not None:
    root = os.path.abspath(_text_path(document_root, "document_root"))
    if not _is_utf8(root):
      raise ValueError(f"document_root={csvfile.printable(root)!r} is not valid UTF-8 text")
    return root
  if not paths:
    return None
  root = os.path.commonpath([os.path.dirname(p) for p in paths])
  if root == os.path.dirname(root):  # the file system's root: "/"
    raise ValueError(
      f"the images have no common folder but {root!r}; pass document_root=FOLDER (a folder "
      "above the images to label; those outside it are left out)"
    )
  return root


def _category_names(categories) -> tuple[str, ...]:
  if isinstance(categories, str):
    raise ValueError(f"categories={categories!r} is one string; expected a list of names")
  names = tuple(categories)
  if not names:
    raise ValueError("categories=[]; expected at least one category name")
  for name in names:
    if not isinstance(name, str):
      raise ValueError(f"category name {name!r} is a {type(name).__name__}; expected text")
    if not name.strip():
      raise ValueError(f"category name {name!r} is blank; expected a non-empty name")
    if not _is_utf8(name):
      raise ValueError(
        f"category name {csvfile.printable(name)!r} holds undecodable bytes; expected text"
      )
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f"category names {repeated} appear more than once; expected distinct names")
  return names


def _thresholds(threshold, names: tuple[str, ...]) -> tuple[float, ...]:
  if isinstance(threshold, numbers.Real) and not isinstance(threshold, bool):
    values = [threshold] * len(names)
  else:
    values = list(threshold)
    if len(values) != len(names):
      raise ValueError(
        f"{len(values)} thresholds for {len(names)} categories; expected one number or one "
        "per category"
      )
  return tuple(
    _probability(t, f"threshold for category {n!r}") for n, t in zip(names, values, strict=True)
  )


def _rows(what: str, rows, n: int) -> list:
  rows = list(rows)
  if len(rows) != n:
    raise ValueError(f"{what} has {len(rows)} rows for {n} images; expected one row per image")
  return rows


def _row(row, names: tuple[str, ...], kind: str, path: str) -> list:
  row = list(row)
  if len(row) != len(names):
    raise ValueError(
      f"{kind}s of {path!r}: {len(row)} values for {len(names)} categories; expected one per "
      "category"
    )
  return row


def _numbers(row, names, kind: str, path: str, *, probability: bool = False) -> tuple:
  """The row's values as floats (the error message is only built for a bad value)."""
  out = []
  for name, value in zip(names, _row(row, names, kind, path), strict=True):
    x = _finite(value)
    if x is None or (probability and not 0.0 <= x <= 1.0):
      raise ValueError(
        f"{kind} of {path!r} for category {name!r} is {value!r}; expected "
        + ("a probability in [0, 1]" if probability else "a finite number")
      )
    out.append(x)
  return tuple(out)


def _finite(value) -> float | None:
  """`value` as a float, or None if it is not a finite real number (bools are not)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    return None
  value = float(value)
  return value + 0.0 if math.isfinite(value) else None  # + 0.0: -0.0 -> 0.0


def _probability(value, what: str) -> float:
  x = _finite(value)
  if x is None or not 0.0 <= x <= 1.0:
    raise ValueError(f"{what} is {value!r}; expected a probability in [0, 1]")
  return x


_ANSWERS = {YES: YES, NO: NO, None: None, 1: YES, 0: NO, -1: None}


def _answers(row, names, path: str) -> tuple:
  out = []
  for name, value in zip(names, _row(row, names, "answer", path), strict=True):
    if isinstance(value, str) or value is None:
      key = value
    elif isinstance(value, numbers.Integral):
      key = int(value)
    else:
      key = "not an answer"
    if key not in _ANSWERS or isinstance(value, bool):
      raise ValueError(
        f"answer of {path!r} for category {name!r} is {value!r}; expected 'yes', 'no' or "
        "None (or 1, 0, -1)"
      )
    out.append(_ANSWERS[key])
  return tuple(out)


def _text_path(value, what: str) -> str:
  try:
    path = os.fspath(value)
  except TypeError:
    raise ValueError(f"{what} {value!r} is a {type(value).__name__}; expected a path") from None
  if not isinstance(path, str) or not path:
    raise ValueError(f"{what} {value!r}; expected a non-empty path as text")
  return path


def _is_utf8(text: str) -> bool:
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:  # surrogate escapes: bytes of a name that is not UTF-8
    return False
  return True


def _dumps(value) -> str:
  """Compact, sorted JSON (the C encoder: `indent` would take the Python one, ~4x slower)."""
  return json.dumps(value, ensure_ascii=False, sort_keys=True, allow_nan=False)


def _prepare_dir(out_dir) -> str:
  out_dir = os.path.abspath(_text_path(out_dir, "out_dir"))
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f"out_dir={out_dir!r} is a file; expected a folder for the export")
  os.makedirs(out_dir, exist_ok=True)
  return out_dir


def _write_atomic(path: str, text: str) -> None:
  """Writes `text` so that a reader sees the old file or the whole new one (`atomic`)."""
  with atomic.replacing(path, newline="\n") as f:
    f.write(text)
