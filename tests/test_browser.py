"""End to end in a real headless browser: Debian's chromium, driven by Selenium through Debian's
chromedriver (no browser download). The tests start `python -m rare_jax.label` and open the
printed URL: on a folder of Fashion-MNIST PNGs, one labels a round by clicking and by keys (with
an undo), submits it with Enter and sees the next round's images and the updated counts, sees an
image large (click, Esc, Z), changes an answer of the submitted batch and writes the results;
another asks about two categories; the last does the whole job on crops of real photographs
with pretrained features (three batches, a deep update started from the page, a changed answer,
an audit with its estimate, Finish, then `rare_jax.predict` on new photos in every format) and
saves the screenshots of the app shown in the README: docs/labeling_app.png (the page with the
audit's estimate) and docs/labeling_enlarged.png (an image enlarged).

Needs `apt-get install -y chromium chromium-driver` (CI's set-up does it); without them this
test fails, saying so.
"""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from rare_jax.data import folder
from tests import photo_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCREENSHOT = os.path.join(REPO, "docs", "labeling_app.png")
SCREENSHOT_ENLARGED = os.path.join(REPO, "docs", "labeling_enlarged.png")
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL = "run `apt-get install -y chromium chromium-driver` as root (CI's set-up does it)"


def _require_browser():
  """Fails (never skips) when the browser, its driver or Selenium is missing."""
  missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
  if missing:
    pytest.fail(f"{' and '.join(missing)} not found: {INSTALL}", pytrace=False)
  try:
    import selenium  # noqa: F401
  except ImportError:
    pytest.fail("selenium is not installed: pip install -e '.[dev]'", pytrace=False)


def _browser(profile_dir):
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service

  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
    f"--user-data-dir={profile_dir}",
  ):
    options.add_argument(flag)
  return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def _wait(predicate, what, timeout=120.0):
  deadline = time.monotonic() + timeout
  last_error = None
  while time.monotonic() < deadline:
    try:
      value = predicate()
      if value:
        return value
    except Exception as error:  # stale elements while the page re-renders
      last_error = error
    time.sleep(0.1)
  raise AssertionError(f"timed out waiting for {what} (last error: {last_error})")


def _start(args, env):
  """Starts `python -m rare_jax.label ARGS`; returns (process, its output lines, the URL)."""
  process = subprocess.Popen(
    [sys.executable, "-m", "rare_jax.label", *args],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  lines, url = [], None
  for line in process.stdout:
    lines.append(line)
    match = re.search(r"http://127\.0\.0\.1:\d+/\?token=\S+", line)
    if match:
      url = match.group(0)
      break
  if not url:
    process.kill()
    raise AssertionError("no URL printed:\n" + "".join(lines))
  threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
  return process, lines, url


def _stop(process, lines):
  process.send_signal(signal.SIGTERM)
  try:
    process.wait(60)
  except subprocess.TimeoutExpired:
    process.kill()
  assert process.returncode == 0, "".join(lines)


# rare_jax.predict's formats, each written by the whole-job test from the deep-updated run (the
# last two are folders: rare_jax.infra.interchange, whose tests check them against the docs).
PREDICT_FORMATS = (
  ("csv", "scores.csv"),
  ("json", "scores.json"),
  ("fiftyone", "fiftyone"),
  ("label-studio", "label_studio"),
)


def check_predict_formats(outputs, images, cat_scores):
  """Every format holds the CSV's scores of Cat (`cat_scores`: path under `images` -> score)."""
  coco = json.loads(outputs["json"].read_text())
  names = {image["id"]: image["file_name"] for image in coco["images"]}
  cat_id = next(c["id"] for c in coco["categories"] if c["name"] == "Cat")
  assert {
    names[a["image_id"]]: a["score"] for a in coco["annotations"] if a["category_id"] == cat_id
  } == pytest.approx(cat_scores, abs=1e-6)
  absolute = {os.path.join(images, p): v for p, v in cat_scores.items()}
  fiftyone = json.loads((outputs["fiftyone"] / "labels.json").read_text())
  assert fiftyone["classes"] == ["Cat", "Rocket"] and set(fiftyone["labels"]) == set(absolute)
  for path, targets in fiftyone["labels"].items():
    cat = [t for t in targets if t["label"] == 0]  # listed when "yes": score >= 0.5
    assert [t["confidence"] for t in cat] == (
      [pytest.approx(absolute[path], abs=1e-6)] * bool(absolute[path] >= 0.5)
    )
  tasks = json.loads((outputs["label-studio"] / "tasks.json").read_text())
  assert {t["data"]["path"]: t["data"]["score_1"] for t in tasks} == pytest.approx(
    absolute, abs=1e-6
  )
  assert all(t["data"]["image"].startswith("/data/local-files/?d=") for t in tasks)
  assert (outputs["label-studio"] / "label_config.xml").read_text().startswith("<View")


def _truth(path):
  return path.startswith("Sandal/") or path.startswith("/")


@pytest.mark.slow
def test_label_a_round_in_chromium(tmp_path, tmp_path_factory):
  _require_browser()
  from selenium.webdriver.common.by import By
  from selenium.webdriver.common.keys import Keys

  images, seed_files = folder.write_example_folder(
    tmp_path, per_class=28, rare_count=20, num_seeds=5
  )
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  # Compilations shared with tests/test_webapp.py's servers (same shapes), across xdist workers.
  base = tmp_path_factory.getbasetemp()
  env["JAX_COMPILATION_CACHE_DIR"] = str(
    (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax_cache"
  )
  process = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "rare_jax.label",
      f"--images={images}",
      f"--seeds={os.path.dirname(seed_files[0])}",
      f"--workdir={tmp_path / 'run'}",
      "--name=Sandal",
      "--budget=10",
      "--batch_size=5",
      "--features=pixel_pca",
      "--feature_dim=16",
      "--image_size=16",
    ],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  lines, url = [], None
  for line in process.stdout:
    lines.append(line)
    match = re.search(r"http://127\.0\.0\.1:\d+/\?token=\S+", line)
    if match:
      url = match.group(0)
      break
  assert url, "no URL printed:\n" + "".join(lines)
  threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
  driver = None
  try:
    driver = _browser(tmp_path / "profile")
    driver.get(url)

    def cards():
      return driver.find_elements(By.CSS_SELECTOR, "#categories .card")

    def card_state():
      return [
        (
          int(c.get_attribute("data-id")),
          c.find_element(By.TAG_NAME, "img").get_attribute("alt"),
          c.get_attribute("class"),
        )
        for c in cards()
      ]

    def text(selector):
      return driver.find_element(By.CSS_SELECTOR, selector).text

    _wait(lambda: len(cards()) == 5, "the first batch in the page")
    assert text("#round") == "1" and text(".labels-used") == "0" and text(".budget") == "10"
    assert "Sandal" in text("#category-0 h2")
    first_round = card_state()
    answers = {image_id: _truth(path) for image_id, path, _ in first_round}
    body = driver.find_element(By.TAG_NAME, "body")

    # Click the first two, then keys on the highlighted (first unanswered) one.
    for index in (0, 1):
      card = cards()[index]
      button = "yes-button" if answers[first_round[index][0]] else "no-button"
      card.find_element(By.CLASS_NAME, button).click()
      _wait(
        lambda i=index: ("yes" in card_state()[i][2]) or ("no" in card_state()[i][2].split()),
        f"card {index} answered",
      )
    for index in (2, 3):
      _wait(lambda i=index: "focus" in card_state()[i][2], f"card {index} highlighted")
      body.send_keys("y" if answers[first_round[index][0]] else "n")
      _wait(lambda i=index: "focus" not in card_state()[i][2], f"card {index} answered by key")
    # Undo the last answer (U) and give it again.
    body.send_keys("u")
    _wait(
      lambda: "focus" in card_state()[3][2] and text("#answered") == "3 of 5 answered", "the undo"
    )
    for index in (3, 4):
      body.send_keys("y" if answers[first_round[index][0]] else "n")
      _wait(lambda i=index: "focus" not in card_state()[i][2], f"card {index} answered by key")
    _wait(lambda: text("#answered") == "5 of 5 answered", "all five answered")
    for image_id, _, classes in card_state():
      assert ("yes" if answers[image_id] else "no") in classes.split()
    body.send_keys("\n")  # Enter submits

    _wait(lambda: text("#round") == "2" and len(cards()) == 5, "the second round", timeout=180)
    second_round = card_state()
    assert not {i for i, _, _ in second_round} & set(answers)  # new images
    assert text(".labels-used") == "5"
    assert text(".positives-found") == str(sum(answers.values()))
    top = driver.find_elements(By.CSS_SELECTOR, "#top .thumb")
    assert len(top) == 24
    assert all(
      img.get_property("naturalWidth") > 0
      for img in driver.find_elements(By.CSS_SELECTOR, "img:not(#viewer-image)")
    )

    # Enlarge: a click on an image shows it large (its own pixels, served by /large); Esc
    # closes it; Z opens the highlighted one, and Z again closes it.
    viewer = driver.find_element(By.ID, "viewer")

    def enlarged():
      image = driver.find_element(By.ID, "viewer-image")
      return viewer.is_displayed() and image.get_property("naturalWidth") > 0 and image

    cards()[0].find_element(By.TAG_NAME, "img").click()
    image = _wait(enlarged, "the enlarged image")
    assert f"/image/{second_round[0][0]}/large?" in image.get_attribute("src")
    assert text("#viewer-caption") == second_round[0][1]
    body.send_keys(Keys.ESCAPE)
    _wait(lambda: not viewer.is_displayed(), "Esc to close the enlarged image")
    body.send_keys("z")
    _wait(lambda: enlarged() and text("#viewer-caption") == second_round[0][1], "Z to enlarge")
    body.send_keys("z")
    _wait(lambda: not viewer.is_displayed(), "Z to close it")

    # A mistaken answer of the submitted batch, changed from the list of answers given.
    def given():
      return {
        int(t.get_attribute("data-id")): t.find_element(By.CLASS_NAME, "badge").text
        for t in driver.find_elements(By.CSS_SELECTOR, "#given .thumb")
      }

    assert given() == {i: "yes" if answers[i] else "no" for i in answers}
    changed = first_round[0][0]
    driver.find_element(By.CSS_SELECTOR, f'#given .thumb[data-id="{changed}"] .change').click()
    flipped = "no" if answers[changed] else "yes"
    _wait(
      lambda: given()[changed] == flipped and text("#round") == "2" and len(cards()) == 5,
      "the corrected answer and the second batch asked again",
      timeout=180,
    )
    found = sum(answers.values()) + (-1 if answers[changed] else 1)
    assert text(".positives-found") == str(found)
    # Finish: the ranked results, and where they are.
    driver.find_element(By.ID, "finish").click()
    _wait(lambda: "ranked_results.csv" in text("#finish-status"), "the results' place")
    assert os.path.exists(tmp_path / "run" / "results" / "ranked_results.csv")
  finally:
    if driver is not None:
      driver.quit()
    process.send_signal(signal.SIGTERM)
    try:
      process.wait(60)
    except subprocess.TimeoutExpired:
      process.kill()
  assert process.returncode == 0, "".join(lines)


@pytest.mark.slow
def test_two_categories_on_one_page(tmp_path, tmp_path_factory):
  """`--category NAME=SEEDS` twice: every question is under its category's heading, and each
  category's button (its answers so far) jumps to its questions."""
  _require_browser()
  from selenium.webdriver.common.by import By

  images, seed_files = folder.write_example_folder(
    tmp_path, per_class=28, rare_count=20, num_seeds=5
  )
  bags = sorted(os.listdir(os.path.join(images, "Bag")))[:3]
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  process = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "rare_jax.label",
      f"--images={images}",
      f"--category=Sandal={os.path.dirname(seed_files[0])}",
      f"--category=Bag={','.join(os.path.join(images, 'Bag', b) for b in bags)}",
      f"--workdir={tmp_path / 'run'}",
      "--budget=10",
      "--batch_size=5",
      "--features=pixel_pca",
      "--feature_dim=16",
      "--image_size=16",
    ],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  lines, url = [], None
  for line in process.stdout:
    lines.append(line)
    match = re.search(r"http://127\.0\.0\.1:\d+/\?token=\S+", line)
    if match:
      url = match.group(0)
      break
  assert url, "no URL printed:\n" + "".join(lines)
  threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
  driver = None
  try:
    driver = _browser(tmp_path / "profile")
    driver.get(url)
    _wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#categories .card")) == 10, "cards")
    headings = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "section.category h2")]
    assert headings == ["Is it Sandal?", "Is it Bag?"]
    for index in (0, 1):
      cards = driver.find_elements(By.CSS_SELECTOR, f"#category-{index} .card")
      assert len(cards) == 5 and all(c.get_attribute("data-category") == str(index) for c in cards)
    tabs = driver.find_elements(By.CSS_SELECTOR, "#category-tabs .tab")
    assert [t.text.split(":")[0] for t in tabs] == ["Sandal", "Bag"]
    assert tabs[1].text.startswith("Bag: 0/5 answered")
    card = driver.find_elements(By.CSS_SELECTOR, "#category-1 .card")[0]
    card.find_element(By.CLASS_NAME, "no-button").click()
    _wait(
      lambda: driver.find_elements(By.CSS_SELECTOR, "#category-tabs .tab")[1].text.startswith(
        "Bag: 1/5 answered"
      ),
      "the Bag button to count the answer",
    )
    driver.find_elements(By.CSS_SELECTOR, "#category-tabs .tab")[1].click()
    _wait(
      lambda: (
        driver.execute_script(
          "return Math.abs(document.getElementById('category-1').getBoundingClientRect().top)"
        )
        < 5
      ),
      "the page to scroll to the Bag questions",
    )
  finally:
    if driver is not None:
      driver.quit()
    process.send_signal(signal.SIGTERM)
    try:
      process.wait(60)
    except subprocess.TimeoutExpired:
      process.kill()
  assert process.returncode == 0, "".join(lines)


@pytest.mark.slow
def test_the_whole_job_on_photos(tmp_path, tmp_path_factory):
  """The whole job as a user does it, on crops of real photos with pretrained features
  (EfficientNet-Lite0 at 32x32, the tests' tiny size), two categories: the seeds, a deep update
  queued from the page and run after the first batch, three batches, a changed answer of the
  second batch, an audit of 20 images with its estimate on the page, Finish and its ranked
  results file, then `rare_jax.predict` on a new folder with the deep-updated model in every
  format. The screenshots of this page (the estimate; an image enlarged) are the README's."""
  _require_browser()
  from selenium.webdriver.common.by import By

  images, seeds = photo_folder.write_photo_folder(tmp_path / "photos", per_photo=12)
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  base = tmp_path_factory.getbasetemp()
  env["JAX_COMPILATION_CACHE_DIR"] = str(
    (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax_cache"
  )
  workdir = tmp_path / "run"
  process, lines, url = _start(
    [
      f"--images={images}",
      f"--category=Cat={seeds['cat']}",
      f"--category=Rocket={seeds['rocket']}",
      f"--workdir={workdir}",
      "--budget=12",
      "--batch_size=4",
      "--features=pretrained",
      "--image_size=32",
      "--deep_epochs=1",
    ],
    env,
  )
  driver = None
  try:
    driver = _browser(tmp_path / "profile")
    driver.get(url)

    def cards(category):
      return driver.find_elements(By.CSS_SELECTOR, f"#category-{category} .card")

    def text(selector):
      return driver.find_element(By.CSS_SELECTOR, selector).text

    def deep_status():
      return driver.find_element(By.ID, "deep-section").get_attribute("data-status")

    def answer_card(category, index):
      """Answers card `index` of `category` truthfully (fresh elements: the page re-renders)."""

      def read():  # (path, id) of the card; retried while the page re-renders it
        card = cards(category)[index]
        return card.find_element(By.TAG_NAME, "img").get_attribute("alt"), int(
          card.get_attribute("data-id")
        )

      path, image_id = _wait(read, f"card {index} of category {category}")
      value = path.startswith(("cat/", "rocket/")[category])

      def click():
        card = cards(category)[index]
        assert int(card.get_attribute("data-id")) == image_id
        card.find_element(By.CLASS_NAME, "yes-button" if value else "no-button").click()
        return True

      _wait(click, f"a click on card {index} of category {category}")
      _wait(
        lambda: ("yes" if value else "no") in cards(category)[index].get_attribute("class").split(),
        f"card {index} of category {category} answered",
      )
      return image_id, path, value

    def answer_batch():
      answered = {}
      for category in (0, 1):
        for index in range(4):
          image_id, path, value = answer_card(category, index)
          answered[(category, image_id)] = (path, value)
      _wait(lambda: text("#answered") == "8 of 8 answered", "all eight answered")
      driver.find_element(By.TAG_NAME, "body").send_keys("\n")
      return answered

    # Batch 1, with a deep update queued from the page: it runs once the batch is submitted.
    _wait(lambda: len(cards(0)) == 4 and len(cards(1)) == 4, "the first batch", timeout=240)
    assert deep_status() == "idle"
    driver.find_element(By.ID, "deep-update").click()
    _wait(lambda: deep_status() == "queued", "the deep update to be queued")
    assert "round 1" in text("#deep-status")
    batches = [answer_batch()]
    _wait(lambda: deep_status() == "done", "the deep update to finish", timeout=600)
    assert driver.find_element(By.ID, "deep-progress").get_property("value") == 1
    log = "".join(lines)
    assert "deep update 1: epoch 1/1" in log and "re-embedded" in log
    assert os.path.exists(workdir / "labeling" / "features" / "v1" / "pool" / "meta.json")
    assert not os.path.exists(workdir / "ours_linear")  # the directory says what it holds
    for round_index in (2, 3):
      _wait(
        lambda r=round_index: text("#round") == str(r) and len(cards(0)) == 4,
        f"batch {round_index}",
        timeout=180,
      )
      batches.append(answer_batch())
    _wait(lambda: "Done" in text("#status"), "the budget used", timeout=180)
    assert driver.find_element(By.ID, "deep-update").get_property("disabled")

    # A mistaken answer of batch 2, changed from the list of answers given: the rounds after it
    # are derived again from the corrected answers (no new deep update: v1 came before it).
    def given(category):
      return {
        int(t.get_attribute("data-id")): t.find_element(By.CLASS_NAME, "badge").text
        for t in driver.find_elements(By.CSS_SELECTOR, f'#given .thumb[data-category="{category}"]')
      }

    (category, changed), (changed_path, value) = next(iter(batches[1].items()))
    assert category == 0
    flipped = "no" if value else "yes"
    driver.find_element(
      By.CSS_SELECTOR, f'#given .thumb[data-category="0"][data-id="{changed}"] .change'
    ).click()
    _wait(
      lambda: given(0)[changed] == flipped and "Done" in text("#status"),
      "the corrected answer and the run derived again",
      timeout=300,
    )
    assert not os.path.exists(workdir / "labeling" / "deep" / "v2")

    # An audit of 20 images of Cat drawn by the page, answered truthfully; the estimate shows.
    size = _wait(lambda: driver.find_element(By.ID, "audit-size"), "the audit panel")
    size.clear()
    size.send_keys("20")
    driver.find_element(By.ID, "audit-start").click()
    for k in range(20):
      _wait(lambda k=k: text("#audit-progress").startswith(f"{k} of 20"), f"audit image {k + 1}")
      card = driver.find_element(By.ID, "audit-card")
      path = card.find_element(By.TAG_NAME, "img").get_attribute("alt")
      driver.find_element(By.ID, "audit-yes" if path.startswith("cat/") else "audit-no").click()
    _wait(lambda: text("#audit-progress").startswith("20 of 20"), "the audit answered")
    estimate = _wait(lambda: driver.find_element(By.ID, "audit-estimate"), "the estimate")
    assert "Precision" in estimate.text and "Recall" in estimate.text
    assert "95% interval" in estimate.text

    # Finish: the ranked results of the whole pool for both categories, with the estimate.
    driver.find_element(By.ID, "finish").click()
    _wait(lambda: "ranked_results.csv" in text("#finish-status"), "the results' place")
    with open(workdir / "results" / "ranked_results.csv", newline="") as f:
      rows = list(csv.DictReader(f))
    pool_size = 6 * 12 + 2 * 3
    assert len(rows) == 2 * pool_size
    cat = [r for r in rows if r["category"] == "Cat"]
    assert [int(r["rank"]) for r in cat] == list(range(1, pool_size + 1))
    assert all(r["label"] in ("yes", "no", "none") for r in cat)
    labels = {r["path"]: r["label"] for r in cat}
    truthful = {p: "yes" if v else "no" for b in batches for (c, _), (p, v) in b.items() if c == 0}
    assert {p: labels[p] for p in truthful} == {**truthful, changed_path: flipped}
    results = json.loads((workdir / "results" / "ranked_results.json").read_text())
    assert "estimate" in results["categories"][0] and "estimate" not in results["categories"][1]

    # The screenshots: the page with the audit's estimate, then an image enlarged.
    _wait(
      lambda: all(
        img.get_property("naturalWidth") > 0
        for img in driver.find_elements(By.CSS_SELECTOR, "img:not(#viewer-image)")
      ),
      "every image loaded",
    )
    height = driver.execute_script("return document.documentElement.scrollHeight")
    inner = driver.execute_script("return window.innerHeight")
    driver.set_window_size(1280, 1000 - int(inner) + min(int(height), 3200))
    os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
    assert driver.save_screenshot(SCREENSHOT)
    assert os.path.getsize(SCREENSHOT) > 10_000
    driver.set_window_size(1280, 1000)
    driver.find_element(By.CSS_SELECTOR, "#top .thumb img").click()
    _wait(
      lambda: (
        driver.find_element(By.ID, "viewer").is_displayed()
        and driver.find_element(By.ID, "viewer-image").get_property("naturalWidth") > 0
      ),
      "the enlarged image",
    )
    assert driver.save_screenshot(SCREENSHOT_ENLARGED)
    assert os.path.getsize(SCREENSHOT_ENLARGED) > 10_000
  finally:
    if driver is not None:
      driver.quit()
    _stop(process, lines)

  # New photos scored by the deep-updated model (its trunk embeds them), in every format.
  new_images, _ = photo_folder.write_photo_folder(tmp_path / "new", per_photo=4, seed=1)
  outputs = {}
  for fmt, name in PREDICT_FORMATS:
    out = tmp_path / "scores" / name
    result = subprocess.run(
      [
        sys.executable,
        "-m",
        "rare_jax.predict",
        f"--workdir={workdir}",
        f"--images={new_images}",
        f"--out={out}",
        f"--format={fmt}",
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "after deep update v1" in result.stderr, result.stderr
    outputs[fmt] = out
  with open(outputs["csv"], newline="") as f:
    scored = list(csv.DictReader(f))
  assert len(scored) == 2 * 6 * 4 and {r["category"] for r in scored} == {"Cat", "Rocket"}
  cat_scores = {r["path"]: float(r["score"]) for r in scored if r["category"] == "Cat"}
  cats = [v for p, v in cat_scores.items() if p.startswith("cat/")]
  others = [v for p, v in cat_scores.items() if not p.startswith("cat/")]
  assert min(cats) > sorted(others)[len(others) // 2], (cats, others)  # cats above the median
  check_predict_formats(outputs, new_images, cat_scores)
