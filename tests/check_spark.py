"""Apache Spark reads every table of a flatfhir dataset exactly as pyarrow does (see
check_spark.sh).

Spark's own Parquet reader (the vectorized one, Spark's default) reads each table's live files —
found by replaying `_delta_log` here, since the Delta connector's jars come from Maven, which is
not reachable — and computes per column: the non-null count, and a checksum of the values
(strings and decimals: total length and the sum of the CRC-32s of their UTF-8 text; other
numbers, dates and times: their sum; lists: total size). pyarrow computes the same from the same
files, and every figure must be equal. That covers the encodings and codecs flatfhir picks per
column (dictionary or plain, zstd or Snappy) and the raw `resource` column, whose pages flatfhir
writes itself.

usage: check_spark.py DATASET
"""
import os, sys, zlib

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark.sql import SparkSession, functions as F, types as T

from delta_log import replay_log


def live_files(table_dir):
    """The table's live data files (paths as the log spells them, relative to the table)."""
    return [os.path.join(table_dir, p) for p in sorted(replay_log(table_dir))]


def arrow_figures(files):
    """(rows, {column: (non-null count, checksum)}) as pyarrow reads the files."""
    rows, cols = 0, {}
    for f in files:
        t = pq.read_table(f)
        rows += t.num_rows
        for name in t.column_names:
            c = t.column(name)
            n, s = cols.get(name, (0, 0))
            n += len(c) - c.null_count
            ty = c.type
            if pa.types.is_string(ty) or pa.types.is_large_string(ty):
                for v in c.to_pylist():
                    if v is not None:
                        b = v.encode()
                        s += len(v) + zlib.crc32(b)
            elif pa.types.is_list(ty):
                s += sum(len(v) for v in c.to_pylist() if v is not None)
            elif pa.types.is_decimal(ty) or pa.types.is_uint64(ty):
                # (Spark reads an unsigned 64-bit column as decimal(20, 0).)
                # As text (a sum could overflow Spark's decimal(38)): plain notation, all
                # `scale` digits, as Spark casts a decimal to a string.
                for v in c.to_pylist():
                    if v is not None:
                        txt = str(v) if isinstance(v, int) else format(v, "f")
                        s += len(txt) + zlib.crc32(txt.encode())
            elif pa.types.is_floating(ty):
                s += round(float(pc.sum(c).as_py() or 0.0), 3)
            else:
                # Booleans, integers, dates, times and timestamps as integers (timestamps in
                # microseconds), summed in Python: no overflow.
                if pa.types.is_timestamp(ty):
                    c = c.cast(pa.timestamp("us", tz=ty.tz))
                as_int = pa.int32() if pa.types.is_date32(ty) else pa.int64()
                if pa.types.is_boolean(ty):
                    as_int = pa.int8()
                s += sum(v for v in c.cast(as_int).to_pylist() if v is not None)
            cols[name] = (n, s)
    return rows, cols


def spark_figures(spark, files):
    df = spark.read.parquet(*[f"file://{f}" for f in files])
    aggs, kinds = [F.count(F.lit(1)).alias("__rows")], {}
    def total(e):
        return F.sum(e.cast("decimal(38,0)"))

    for field in df.schema.fields:
        c, ty, name = F.col(f"`{field.name}`"), field.dataType, field.name
        aggs.append(F.count(c).alias(f"n:{name}"))
        if isinstance(ty, T.StringType):
            kinds[name] = "int"
            aggs.append(total(F.length(c) + F.crc32(F.encode(c, "UTF-8"))).alias(f"s:{name}"))
        elif isinstance(ty, T.ArrayType):
            kinds[name] = "int"
            aggs.append(total(F.size(c)).alias(f"s:{name}"))
        elif isinstance(ty, T.BooleanType):
            kinds[name] = "int"
            aggs.append(total(c.cast("int")).alias(f"s:{name}"))
        elif isinstance(ty, (T.TimestampType, T.TimestampNTZType)):
            kinds[name] = "int"
            aggs.append(total(F.unix_micros(c.cast("timestamp"))).alias(f"s:{name}"))
        elif isinstance(ty, T.DateType):
            kinds[name] = "int"
            aggs.append(total(F.unix_date(c)).alias(f"s:{name}"))
        elif isinstance(ty, T.DecimalType):
            kinds[name] = "int"
            text = c.cast("string")
            aggs.append(total(F.length(text) + F.crc32(F.encode(text, "UTF-8"))).alias(f"s:{name}"))
        elif isinstance(ty, (T.FloatType, T.DoubleType)):
            kinds[name] = "float"
            aggs.append(F.sum(c).alias(f"s:{name}"))
        else:
            kinds[name] = "int"
            aggs.append(total(c).alias(f"s:{name}"))
    r = df.agg(*aggs).collect()[0].asDict()
    cols = {}
    for name, kind in kinds.items():
        s = r[f"s:{name}"]
        s = 0 if s is None else (round(float(s), 3) if kind == "float" else int(s))
        cols[name] = (r[f"n:{name}"], s)
    return r["__rows"], cols


def main():
    ds = sys.argv[1]
    spark = (
        SparkSession.builder.master("local[2]")
        .appName("flatfhir-check")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    assert spark.conf.get("spark.sql.parquet.enableVectorizedReader") == "true"
    tables = sorted(
        d for d in os.listdir(ds)
        if os.path.isdir(os.path.join(ds, d, "_delta_log"))
    )
    assert tables, f"no Delta tables in {ds}"
    bad, rows = 0, 0
    for table in tables:
        files = live_files(os.path.join(ds, table))
        if not files:
            continue
        want = arrow_figures(files)
        got = spark_figures(spark, files)
        rows += got[0]
        if got != want:
            bad += 1
            diff = {k: (got[1].get(k), v) for k, v in want[1].items() if got[1].get(k) != v}
            print(f"{table}: Spark {got[0]} rows, pyarrow {want[0]}; columns that differ (Spark, pyarrow): {diff}")
    print(f"Spark {spark.version}: {len(tables)} tables, {rows} rows, {bad} differ from pyarrow")
    spark.stop()
    sys.exit(1 if bad else 0)


main()
