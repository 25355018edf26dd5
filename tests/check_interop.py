"""Read a flatfhir dataset as Delta Lake tables with engines other than flatfhir, and check them
against the run records (see check_interop.sh):

* PyPI `deltalake` (delta-rs's Python reader) and `polars` (`pl.read_delta`) read every table;
* an independent reader written here replays `_delta_log` itself (JSON commits, and the newest
  checkpoint when there is one: add/remove actions in order), then reads the live files with
  pyarrow and DuckDB — so a bug shared by delta-rs's writer and reader cannot pass unseen;
* history tables hold, per run (the `export` partition), exactly the rows the run record counts;
* every `<view>_latest` table has the same rows in every reader, and at most one version per id.

usage: check_interop.py DATASET [--expect-runs N]
"""
import collections, glob, json, os, sys

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import DeltaTable

from delta_log import replay_log

ds = sys.argv[1]
expect_runs = int(sys.argv[sys.argv.index("--expect-runs") + 1]) if "--expect-runs" in sys.argv else None


def read_independently(table_dir):
    """The table's rows as pyarrow reads its live files, partition values added as columns."""
    tables = []
    for path, parts in sorted(replay_log(table_dir).items()):
        t = pq.read_table(os.path.join(table_dir, path))
        for k, v in parts.items():
            t = t.append_column(k, pa.array([v] * t.num_rows, pa.string()))
        tables.append(t)
    return tables


runs = [json.load(open(f)) for f in glob.glob(os.path.join(ds, "_runs", "*.json"))]
if expect_runs is not None and len(runs) != expect_runs:
    sys.exit(f"{len(runs)} run records, expected {expect_runs}")
expected = collections.defaultdict(collections.Counter)  # view -> export -> rows
for r in runs:
    for v, n in r["views"].items():
        if n:
            expected[v][r["export"]] += n
    for t in r.get("committed", {}):
        if t in r["views"] and r["views"][t] == 0:
            sys.exit(f"run {r['run_id']} committed {t} with no rows")

con = duckdb.connect()
failed = 0
tables = sorted(d for d in os.listdir(ds) if os.path.isdir(os.path.join(ds, d, "_delta_log")))
for missing in sorted(set(expected) - set(tables)):
    print(f"{missing}: rows in the run records but no Delta table")
    failed += 1
for name in tables:
    path = os.path.join(ds, name)
    dt = DeltaTable(path)
    arrow = dt.to_pyarrow_table()
    polars = pl.read_delta(path)
    mine = read_independently(path)
    files = [os.path.join(path, p) for p in replay_log(path)]
    duck = con.sql(f"select count(*) from read_parquet({files!r}, union_by_name = true)").fetchone()[0] if files else 0
    n_mine = sum(t.num_rows for t in mine)
    counts = {arrow.num_rows, polars.height, n_mine, duck}
    ok = len(counts) == 1
    detail = ""
    if name in expected:  # a history table: rows per run as the run records say
        got = collections.Counter(arrow.column("export").to_pylist())
        got_mine = collections.Counter(v for t in mine for v in t.column("export").to_pylist())
        ok &= dict(got) == dict(expected[name]) == dict(got_mine)
        detail = f"runs {len(expected[name])}"
    elif name.endswith("_latest"):
        # One version per resource: all rows of an id come from one run.
        base = name[: -len("_latest")]
        keys = next((r["view_keys"][base] for r in runs if base in r.get("view_keys", {})), None)
        if keys and keys.get("id_column") and arrow.num_rows:
            idc = keys["id_column"]
            per_id = con.sql(
                f"select count(distinct export) from arrow group by \"{idc}\" having count(distinct export) > 1"
            ).fetchall()
            ok &= not per_id
            detail = f"ids {len(set(arrow.column(idc).to_pylist()))}"
    failed += not ok
    print(f"{name:44} rows {arrow.num_rows:6}  polars {polars.height:6}  log replay {n_mine:6}  duckdb {duck:6}  {detail:10} {'ok' if ok else 'MISMATCH'}")
print(f"{len(runs)} runs, {len(tables)} Delta tables: {'all equal' if not failed else f'{failed} MISMATCHES'}")
sys.exit(1 if failed else 0)
