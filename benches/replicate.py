"""Concatenate a bulk export N times with ids rewritten per copy (so ids stay unique)."""
import glob, os, re, sys

src, out, copies = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.makedirs(out, exist_ok=True)
uuid = re.compile(r'([0-9a-f]{8})(-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})')
for f in sorted(glob.glob(os.path.join(src, "*.ndjson"))):
    data = open(f, encoding="utf-8").read()
    with open(os.path.join(out, os.path.basename(f)), "w", encoding="utf-8") as w:
        for i in range(copies):
            w.write(data if i == 0 else uuid.sub(lambda m: f"{int(m.group(1), 16) ^ i:08x}{m.group(2)}", data))
