//! One scan of a resource's root object for all the views of its type.
//!
//! Each view finds the members its root-level columns read in one scan of the resource's keys
//! ([`super::dispatch`]), and each root-level `forEach` (`category.coding`, `component`) looks
//! up its first member on its own: over the four Observation views that is a scan of the root
//! per view plus three more lookups of the same keys per resource, for members the base view's
//! scan has just passed over. A [`RootScan`], compiled once per resource type from every view of
//! it, scans the root once for the union of those steps, and each view takes its members from
//! that scan ([`RootSites`]) instead of looking again.
//!
//! What a step resolves to depends only on the step and the object's keys (see
//! [`MemberDispatch::scan`]): a step of the union resolves exactly as it does in a view's own
//! dispatch. When the union does not fit one dispatch (more than [`MAX_CHILDREN`] distinct
//! steps, names that defeat the hash) or only one place reads the root, there is no `RootScan`
//! and every view scans on its own as before.

use super::compile::{CompiledView, RootSite};
use super::dispatch::{MAX_CHILDREN, MemberDispatch, Resolved, Scan, scanned};
use super::fhirpath::Step;
use super::json::Json;

/// A site child that the union does not serve (its step navigates on its own).
const NONE: u8 = u8::MAX;

/// The scan of a resource's root for all the views of its type: one scan of its keys for the
/// union of the steps every view reads there, handed to each view as if it had scanned itself
/// (see the docs of `src/view/root_scan.rs` for when there is none).
#[derive(Debug)]
pub struct RootScan {
    /// The dispatch of the distinct steps read from the root, by every view.
    pub(super) dispatch: MemberDispatch,
    /// Per view (in the order given to [`RootScan::new`]), its root sites by number.
    views: Vec<Vec<Site>>,
}

/// How one root site of a view (see [`CompiledView::root_sites`]) takes its members from the
/// union's scan.
#[derive(Debug)]
enum Site {
    /// The children of a trie level: `back[j]` is the site child reading union child `j`
    /// ([`NONE`] when none does); `mask` has a bit per union child the site reads.
    Trie { back: Box<[u8]>, mask: u64 },
    /// The first step of a `forEach`: union child `j`.
    First(u8),
}

impl RootScan {
    /// The scan serving the root sites of `views` (all of one resource type); `None` when
    /// fewer than two sites read the root, or their steps do not fit one dispatch.
    pub fn new<'v>(views: impl IntoIterator<Item = &'v CompiledView>) -> Option<RootScan> {
        let per_view: Vec<Vec<RootSite<'v>>> =
            views.into_iter().map(CompiledView::root_sites).collect();
        if per_view.iter().map(Vec::len).sum::<usize>() < 2 {
            return None;
        }
        let mut union: Vec<&Step> = Vec::new();
        let mut index = |step: &'v Step| -> Option<u8> {
            if !scanned(step) {
                return Some(NONE);
            }
            let j = match union.iter().position(|s| *s == step) {
                Some(j) => j,
                None => {
                    union.push(step);
                    union.len() - 1
                }
            };
            (j < MAX_CHILDREN).then_some(j as u8)
        };
        // (view, site) → the union child of each site child.
        let mut maps: Vec<Vec<(bool, Vec<u8>)>> = Vec::with_capacity(per_view.len());
        for sites in &per_view {
            let mut view = Vec::with_capacity(sites.len());
            for site in sites {
                view.push(match site {
                    RootSite::Trie(steps) => {
                        (true, steps.iter().map(|s| index(s)).collect::<Option<_>>()?)
                    }
                    RootSite::First(step) => (false, vec![index(step)?]),
                });
            }
            maps.push(view);
        }
        let dispatch = MemberDispatch::new(union.iter().copied())?;
        let views = maps
            .into_iter()
            .map(|sites| {
                sites
                    .into_iter()
                    .map(|(trie, map)| {
                        if !trie {
                            return Site::First(map[0]);
                        }
                        let mut back = vec![NONE; union.len()].into_boxed_slice();
                        let mut mask = 0;
                        for (i, &j) in map.iter().enumerate() {
                            if j != NONE {
                                back[usize::from(j)] = i as u8;
                                mask |= 1u64 << j;
                            }
                        }
                        Site::Trie { back, mask }
                    })
                    .collect()
            })
            .collect();
        Some(RootScan { dispatch, views })
    }

    /// Number of union children (slots of the scan).
    pub(super) fn len(&self) -> usize {
        self.dispatch.len()
    }
}

/// A [`RootScan`] of one resource: the members found are in the evaluation buffers that did
/// the scan ([`crate::view::EvalBuffers::scan_root`]).
#[derive(Debug, Clone, Copy)]
pub struct ScannedRoot<'s> {
    pub(super) root: &'s RootScan,
    pub(super) scan: Scan,
}

impl<'s> ScannedRoot<'s> {
    /// What view `view` (its index in [`RootScan::new`]'s list) takes from the scan, for
    /// [`CompiledView::evaluate_given`] with the same buffers and resource.
    pub fn view(&self, view: usize) -> RootSites<'s> {
        RootSites {
            dispatch: &self.root.dispatch,
            scan: self.scan,
            sites: self.root.views.get(view).map_or(&[], Vec::as_slice),
        }
    }
}

/// The members one view's root sites take from a [`ScannedRoot`].
#[derive(Debug, Clone, Copy)]
pub struct RootSites<'s> {
    dispatch: &'s MemberDispatch,
    scan: Scan,
    sites: &'s [Site],
}

impl RootSites<'_> {
    /// What the view's own dispatch of trie site `site` would have found scanning the root:
    /// its [`Scan`], with the members of the site's children written into `found` (`None`
    /// when `site` is not a trie site). `union_found` holds the union's members.
    pub(super) fn take<'a>(
        &self,
        site: usize,
        union_found: &[Option<Json<'a>>],
        found: &mut [Option<Json<'a>>],
    ) -> Option<Scan> {
        let Some(Site::Trie { back, mask }) = self.sites.get(site) else {
            return None;
        };
        let mut s = Scan::default();
        let mut bits = (self.scan.present | self.scan.navigate) & mask;
        while bits != 0 {
            let j = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let (jb, ib) = (1u64 << j, 1u64 << back[j]);
            if self.scan.present & jb != 0 {
                s.present |= ib;
                found[usize::from(back[j])] = union_found[j];
            }
            if self.scan.navigate & jb != 0 {
                s.navigate |= ib;
            }
        }
        Some(s)
    }

    /// How the first step of the `forEach` at site `site` gets its values (`None` when `site`
    /// is not such a site).
    pub(super) fn first<'a>(
        &self,
        site: usize,
        union_found: &[Option<Json<'a>>],
    ) -> Option<Resolved<'a>> {
        match self.sites.get(site) {
            Some(&Site::First(j)) if j != NONE => Some(self.dispatch.resolve(
                usize::from(j),
                self.scan,
                union_found,
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{EvalScratch, ViewRegistry, json::JsonDoc};
    use proptest::prelude::*;

    /// Observation views reading the root in every way a site can: the defaults, and user
    /// views with columns in nested selects and `unionAll` branches, choice elements read as
    /// members and as types, `forEach`/`forEachOrNull` over members, choice elements and
    /// steps that navigate on their own.
    fn views() -> Vec<std::sync::Arc<CompiledView>> {
        let mut reg = ViewRegistry::builtin().expect("builtin views");
        for v in [
            r#"{"resourceType":"ViewDefinition","name":"obs_a","resource":"Observation",
              "select":[{"column":[{"name":"st","path":"status"},
                {"name":"vs","path":"valueString"},
                {"name":"vq","path":"value.ofType(Quantity).value","type":"decimal"},
                {"name":"v","path":"value","collection":true,"type":"string"},
                {"name":"vcode","path":"value.ofType(code)"},
                {"name":"vstr","path":"value.ofType(string)"}],
                "select":[{"column":[{"name":"eff","path":"effective.ofType(dateTime)"},
                  {"name":"cat","path":"category.first().text"}]}]},
                {"forEachOrNull":"component","column":[{"name":"ct","path":"code.text"}]},
                {"forEach":"value.ofType(CodeableConcept).coding",
                 "column":[{"name":"vc","path":"code"}]}]}"#,
            r#"{"resourceType":"ViewDefinition","name":"obs_b","resource":"Observation",
              "select":[{"column":[{"name":"id","path":"getResourceKey()"},
                {"name":"code_text","path":"code.text"},{"name":"st","path":"status"}]},
                {"unionAll":[{"forEach":"code.coding","column":[{"name":"c","path":"code"}]},
                  {"forEach":"category.coding","column":[{"name":"c","path":"code"}]},
                  {"column":[{"name":"c","path":"status"}]}]},
                {"forEachOrNull":"Observation.code.coding",
                 "column":[{"name":"s","path":"system"}]},
                {"forEachOrNull":"interpretation.first().coding",
                 "column":[{"name":"i","path":"code"}]}]}"#,
        ] {
            reg.add_json(v, "test").expect("a view");
        }
        reg.views_for("Observation").cloned().collect()
    }

    fn value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::json;
        let leaf = prop_oneof![
            Just(json!(null)),
            Just(json!("final")),
            Just(json!(1.5)),
            Just(json!(true)),
            Just(json!({"coding":[{"system":"s","code":"c"},{"code":"d"}],"text":"t"})),
            Just(json!({"value":2,"unit":"mg","code":"[mg]"})),
            Just(json!({"reference":"Patient/p1"})),
            Just(json!({"start":"2020-01-01","end":"2020-02-01"})),
            Just(json!("2020-01-02T03:04:05Z")),
        ];
        leaf.prop_recursive(2, 8, 3, |inner| {
            prop::collection::vec(inner, 0..3).prop_map(serde_json::Value::from)
        })
    }

    /// A resource-like object: keys drawn from what the views read, their choice elements,
    /// near misses and repeats, in any order.
    fn resource() -> impl Strategy<Value = String> {
        let keys = prop::sample::select(vec![
            "resourceType",
            "id",
            "status",
            "code",
            "category",
            "component",
            "subject",
            "encounter",
            "value",
            "valueQuantity",
            "valueString",
            "valueCode",
            "valueAge",
            "valueCodeableConcept",
            "valueBoolean",
            "valueMarkdown",
            "Value",
            "effective",
            "effectiveDateTime",
            "effectivePeriod",
            "interpretation",
            "issued",
            "meta",
        ]);
        prop::collection::vec((keys, value()), 0..10).prop_map(|members| {
            let body: Vec<String> = members
                .iter()
                .map(|(k, v)| {
                    let v = if *k == "resourceType" {
                        serde_json::json!("Observation")
                    } else {
                        v.clone()
                    };
                    format!("{}:{v}", serde_json::Value::from(*k))
                })
                .collect();
            format!("{{{}}}", body.join(","))
        })
    }

    /// Every view's rows (or error) for `text`, with the root scan or each view on its own.
    fn evaluate_all(views: &[std::sync::Arc<CompiledView>], text: &str, shared: bool) -> String {
        let root = RootScan::new(views.iter().map(|v| &**v)).expect("a root scan");
        let doc = JsonDoc::parse(text).expect("json");
        let mut scratch = EvalScratch::new();
        let mut bufs = scratch.lend();
        let scanned = if shared {
            Some(bufs.scan_root(&root, doc.root()).expect("an object"))
        } else {
            None
        };
        let mut shown = String::new();
        for (k, v) in views.iter().enumerate() {
            let mut ids = Vec::new();
            let r = v.evaluate_given(
                doc.root(),
                &mut ids,
                &mut bufs,
                None,
                scanned.map(|s| s.view(k)),
            );
            let width = v.columns().len();
            let rows: Vec<Vec<_>> = ids
                .iter()
                .map(|&id| bufs.row(id, width).collect())
                .collect();
            shown.push_str(&format!("{}: {r:?} {rows:?}\n", v.name()));
        }
        shown
    }

    /// The views serve each other's root sites from one scan: the defaults' child views their
    /// `forEach` paths, the user views their columns, nested selects and branches.
    #[test]
    fn the_root_sites_of_all_views_share_one_scan() {
        let views = views();
        let root = RootScan::new(views.iter().map(|v| &**v)).expect("a root scan");
        let sites: Vec<Vec<RootSite<'_>>> = views.iter().map(|v| v.root_sites()).collect();
        let by_name = |n: &str| &sites[views.iter().position(|v| v.name() == n).unwrap()];
        assert!(matches!(by_name("observation")[..], [RootSite::Trie(_)]));
        assert!(matches!(
            by_name("observation_component")[..],
            [RootSite::Trie(_), RootSite::First(Step::Member(_))]
        ));
        // Trie sites at the root, in a nested select and in a branch; forEach sites over a
        // member, a choice element and in branches; none for `Observation.code.coding`.
        assert_eq!(by_name("obs_a").len(), 4);
        assert!(matches!(
            by_name("obs_a")[3],
            RootSite::First(Step::TypedMember(..))
        ));
        assert_eq!(by_name("obs_b").len(), 4);
        assert!(root.len() > 20 && root.views.len() == views.len());
    }

    #[test]
    fn no_root_scan_when_two_steps_read_one_choice_element() {
        let a = CompiledView::from_json(
            r#"{"resource":"Observation","select":[{"column":[
              {"name":"a","path":"value.ofType(Quantity).value"},{"name":"s","path":"status"}]}]}"#,
            "a",
        )
        .unwrap();
        let b = CompiledView::from_json(
            r#"{"resource":"Observation","select":[{"column":[
              {"name":"b","path":"value.ofType(FHIR.Quantity).unit"},{"name":"s","path":"status"}]}]}"#,
            "b",
        )
        .unwrap();
        assert!(RootScan::new([&a, &a]).is_some());
        assert!(RootScan::new([&a, &b]).is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]
        /// Taking the members from one scan of the root gives every view the rows (or the
        /// error) that scanning and navigating on its own gives.
        #[test]
        fn one_root_scan_gives_what_each_view_finds_alone(text in resource()) {
            let views = views();
            prop_assert_eq!(evaluate_all(&views, &text, true), evaluate_all(&views, &text, false));
        }
    }
}
