"""A Delta table's live files, by replaying its `_delta_log` here rather than through a Delta
reader (shared by check_interop.py and check_spark.py): the newest checkpoint when there is one,
then the JSON commits after it, add and remove actions in order."""
import glob, json, os

import pyarrow.parquet as pq


def replay_log(table_dir):
    """Live files of a Delta table by replaying its log: {path: partition values}."""
    log = os.path.join(table_dir, "_delta_log")
    live, start = {}, -1
    last = os.path.join(log, "_last_checkpoint")
    if os.path.exists(last):
        cp = json.load(open(last))
        start = cp["version"]
        parts = sorted(glob.glob(os.path.join(log, f"{start:020d}.checkpoint*.parquet")))
        for part in parts:
            t = pq.read_table(part, columns=["add", "remove"]).to_pylist()
            for row in t:
                if row.get("add"):
                    a = row["add"]
                    live[a["path"]] = dict(a["partitionValues"] or {})
    commits = sorted(
        f for f in glob.glob(os.path.join(log, "*.json"))
        if os.path.basename(f)[:20].isdigit() and int(os.path.basename(f)[:20]) > start
    )
    versions = [int(os.path.basename(f)[:20]) for f in commits]
    assert versions == list(range(start + 1, start + 1 + len(versions))), f"gap in {log}: {versions}"
    for f in commits:
        for line in open(f):
            action = json.loads(line)
            if "add" in action:
                a = action["add"]
                live[a["path"]] = dict(a["partitionValues"] or {})
            elif "remove" in action:
                live.pop(action["remove"]["path"], None)
    return live
