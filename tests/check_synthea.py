"""Cross-check a flatfhir dataset with DuckDB against the source ndjson (see check_synthea.sh)."""
import collections, decimal, glob, json, os, re, sys

import duckdb

src, ds = sys.argv[1], sys.argv[2]
lines = collections.Counter()
patients, obs_values = {}, {}
for f in glob.glob(os.path.join(src, "*.ndjson")):
    for line in open(f, encoding="utf-8"):
        if not line.strip():
            continue
        r = json.loads(line, parse_float=decimal.Decimal)
        t = r["resourceType"]
        lines[t] += 1
        if t == "Patient":
            patients[r["id"]] = (r.get("gender"), r.get("birthDate"))
        if t == "Observation" and "valueQuantity" in r:
            obs_values[r["id"]] = r["valueQuantity"].get("value")

snake = lambda s: re.sub(r"(?<!^)([A-Z])", r"_\1", s).lower()
con = duckdb.connect()
failed = 0
for t, n in sorted(lines.items()):
    got = con.sql(f"select count(*) from read_parquet('{ds}/{snake(t)}/**/*.parquet', hive_partitioning=true)").fetchone()[0]
    ok = got == n
    failed += not ok
    print(f"{t:28} lines {n:7}  rows {got:7}  {'ok' if ok else 'MISMATCH'}")

rows = con.sql(f"select id, gender, cast(birth_date as varchar), birth_date_text from read_parquet('{ds}/patient/**/*.parquet')").fetchall()
bad = [r for r in rows if patients.get(r[0]) != (r[1], r[3]) or not (r[3] or "").startswith(r[2][:len(r[3] or "")])]
print(f"patient gender/birth_date: {len(rows) - len(bad)}/{len(rows)} equal the source")
failed += bool(bad) or len(rows) != len(patients)

rows = con.sql(f"select id, value_quantity from read_parquet('{ds}/observation/**/*.parquet') where value_quantity is not null").fetchall()
bad = [r for r in rows if decimal.Decimal(r[1]) != obs_values.get(r[0])]
print(f"observation value_quantity: {len(rows) - len(bad)}/{len(obs_values)} equal the source")
failed += bool(bad) or len(rows) != len(obs_values)
kinds = con.sql(f"select distinct export from read_parquet('{ds}/observation/**/*.parquet', hive_partitioning=true)").fetchall()
print(f"partition column export: {kinds}")
if len(sys.argv) > 3:
    # A second dataset written by `flatfhir export` from the same files: same rows per type.
    def types(d):
        runs = [json.load(open(f)) for f in glob.glob(os.path.join(d, "_runs", "*.json"))]
        out = collections.Counter()
        for r in runs:
            for t, c in r["types"].items():
                out[t] += c["rows"]
        return out
    a, b = types(ds), types(sys.argv[3])
    same = a == b
    failed += not same
    print(f"export over loopback vs convert: {'same rows per type' if same else f'DIFFERENT: {a} vs {b}'} ({sum(b.values())} rows)")
sys.exit(1 if failed else 0)
