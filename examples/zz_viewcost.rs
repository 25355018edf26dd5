use flatfhir::view::{ViewRegistry, EvalScratch, json::JsonDoc};
use std::time::Instant;
fn main() {
    let dir = std::env::args().nth(1).unwrap();
    let only = std::env::args().nth(2);
    let reg = ViewRegistry::builtin().unwrap();
    let mut lines_by_type: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|s| s.to_str()) != Some("ndjson") { continue; }
        let t = std::fs::read_to_string(&p).unwrap();
        for l in t.lines() {
            let d = JsonDoc::parse(l).unwrap();
            let rt = d.root().get("resourceType").unwrap().as_str().unwrap().to_string();
            lines_by_type.entry(rt).or_default().push(l.to_string());
        }
    }
    let mut total = 0.0;
    let mut rows_out = vec![];
    for (rt, lines) in &lines_by_type {
        let docs: Vec<JsonDoc> = lines.iter().map(|l| JsonDoc::parse(l).unwrap()).collect();
        let t0 = Instant::now();
        for _ in 0..3 { for l in lines { let _ = JsonDoc::parse(l).unwrap(); } }
        let parse = t0.elapsed().as_secs_f64() / 3.0;
        println!("{rt:24} {:6} lines parse {:7.1} ms", lines.len(), parse * 1e3);
        total += parse;
        for v in reg.views_for(rt) {
            if only.as_deref().is_some_and(|o| o != v.name()) { continue; }
            let t0 = Instant::now();
            let mut n = 0;
            let mut scratch = EvalScratch::new();
            let mut rows = Vec::new();
            for _ in 0..3 {
                for d in &docs {
                    let mut b = scratch.lend();
                    rows.clear();
                    v.evaluate_with(d.root(), &mut rows, &mut b).unwrap();
                    n += rows.len();
                    rows_out.push(rows.len());
                    scratch.restore(b);
                }
            }
            let el = t0.elapsed().as_secs_f64() / 3.0;
            total += el;
            println!("   {:40} rows {:7} cols {:3}  {:7.1} ms", v.name(), n / 3, v.columns().len(), el * 1e3);
        }
    }
    println!("total {:.1} ms", total * 1e3);
}
