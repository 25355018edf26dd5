"""Read a flatfhir dataset with DuckDB and pyarrow; check rows and the `export` partition column
against the run manifests (see check_interop.sh)."""
import collections, glob, json, os, sys

import duckdb
import pyarrow.dataset as pads

ds = sys.argv[1]
runs = [json.load(open(f)) for f in glob.glob(os.path.join(ds, "_runs", "*.json"))]
expected = collections.defaultdict(collections.Counter)  # view -> export -> rows
for r in runs:
    for v, n in r["views"].items():
        expected[v][r["export"]] += n
failed = 0
con = duckdb.connect()
for view, per_export in sorted(expected.items()):
    want = {e: n for e, n in per_export.items() if n}
    if not want:
        continue
    # DuckDB: the Hive partition column comes from the directory names.
    got_duck = dict(con.sql(
        f"select export, count(*) from read_parquet('{ds}/{view}/*/*.parquet', hive_partitioning = true) group by export"
    ).fetchall())
    # pyarrow: the same tree as a dataset with a Hive partitioning.
    table = pads.dataset(os.path.join(ds, view), format="parquet", partitioning="hive").to_table()
    got_arrow = collections.Counter(table.column("export").to_pylist())
    ok = got_duck == want and dict(got_arrow) == want
    failed += not ok
    print(f"{view:42} runs {len(want)} rows {sum(want.values()):6}  duckdb {sum(got_duck.values()):6}  pyarrow {table.num_rows:6}  {'ok' if ok else 'MISMATCH'}")
print(f"{len(runs)} runs, {len(expected)} views: {'all equal' if not failed else f'{failed} MISMATCHES'}")
sys.exit(1 if failed else 0)
