"""The page's Finish action and the audit wired into the labeling server (issue 26, items 2 and
3 on the page): POST /api/finish writes the ranked results of the whole pool for every category
(`exports.write_results`) and the state says where, in plain words; the audit's routes and
script are served with the app's token check."""

import csv
import os
import time

import pytest

from rare_jax.data import folder
from rare_jax.webapp import folder_run, server
from rare_jax.webapp.session import LabelingSession

TOKEN = "test-token-0123456789abcdef"


def wait_for(predicate, what, timeout=120.0):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    value = predicate()
    if value:
      return value
    time.sleep(0.05)
  raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("finish")
  images, seed_files = folder.write_example_folder(tmp, per_class=28, rare_count=20, num_seeds=5)
  config = folder_run.make_config(budget=10, batch_size=5, feature_dim=16, image_size=16)
  run = folder_run.prepare_folder_run(
    str(tmp / "run"),
    images=images,
    seeds=",".join(seed_files),
    config=config,
    category_name="Sandal",
    log=lambda _: None,
  )
  session = LabelingSession(run, log=lambda _: None)
  client = server.create_app(session, token=TOKEN).test_client()
  session.start()
  yield run, client
  session.stop()


def state_of(client):
  return client.get("/api/state", headers={"X-Token": TOKEN}).get_json()


def post(client, path, body):
  return client.post(f"{path}?token={TOKEN}", json=body)


def test_finish_writes_the_ranked_results_and_says_where(served):
  run, client = served
  state = wait_for(lambda: (s := state_of(client))["phase"] == "labeling" and s, "round 1")
  refused = post(client, "/api/finish", {})
  assert refused.status_code == 409 and "no batch labeled yet" in refused.get_json()["error"]
  assert post(client, "/api/finish", {"x": 1}).status_code == 400
  serial = state["serial"]
  for q in state["categories"][0]["query"]:
    body = {"serial": serial, "category": 0, "id": q["id"], "answer": q["path"] < "T"}
    assert post(client, "/api/answer", body).status_code == 200
  assert post(client, "/api/submit", {"serial": serial}).status_code == 200
  wait_for(lambda: state_of(client)["round"] == 2 and state_of(client)["phase"] == "labeling", "2")
  response = post(client, "/api/finish", {})
  assert response.status_code == 200, response.get_json()
  results = response.get_json()["results"]
  assert results == response.get_json()["written"] == state_of(client)["results"]
  assert results["csv"] == os.path.join(run.workdir, "results", "ranked_results.csv")
  assert results["round"] == 1
  assert results["message"].startswith(
    f"The ranked results of all {run.pool_size} images for Sandal, from the model of batch 1, "
    f"are in {results['csv']} (a table"
  )
  with open(results["csv"], newline="") as f:
    rows = list(csv.reader(f))
  assert len(rows) == 1 + run.pool_size and rows[1][1] == "1"
  assert os.path.exists(results["json"])


def test_the_audit_is_served_with_the_page(served):
  _, client = served
  page = client.get(f"/?token={TOKEN}")
  assert b'<script src="audit.js?token=' in page.data
  assert client.get("/audit.js").status_code == 401
  script = client.get(f"/audit.js?token={TOKEN}")
  assert script.status_code == 200 and script.mimetype == "text/javascript"
  overview = client.get("/api/audit", headers={"X-Token": TOKEN})
  assert overview.status_code == 200
  assert [c["name"] for c in overview.get_json()["categories"]] == ["Sandal"]
