//! One scan of an object's members for all the member steps read from it.
//!
//! A view's member-chain columns form a trie ([`super::compile`]); the children of one trie node
//! are the members read from the same object (`code`, `status`, `subject`, `valueQuantity`, …:
//! thirty or more at the root of a base view). Looking each one up on its own scans the
//! object's keys once per child, so the keys of a resource's root are compared hundreds of
//! times. A [`MemberDispatch`] compiled for the node's children instead scans the object once:
//! each key is looked up in a perfect hash of the names the children read, and the member found
//! is handed to its child.
//!
//! The scan does only what is sure to give the same result as navigation member by member
//! ([`crate::view::fhirpath::eval`]); anything else is left to it ([`Resolved::Navigate`]):
//!
//! - `name`: the member `name` when present (it wins over choice elements, as in navigation);
//!   when absent and no key is `name` followed by an upper-case letter (a possible choice
//!   element `nameType`), nothing; otherwise the child navigates.
//! - `name.ofType(T)`: the member `nameT` when present; otherwise, when the plain member
//!   `name` is present, or another choice element `nameX` whose type `X` is a specialisation
//!   of `T` (`valueCode` for `value.ofType(string)`, `valueAge` for `value.ofType(Quantity)`),
//!   the child navigates; otherwise nothing. Only `string`, `uri`, `integer` and `Quantity`
//!   have specialisations, so an Observation's `valueQuantity` settles its `value.ofType(boolean)`,
//!   `value.ofType(CodeableConcept)`, … at once instead of each scanning the object again.
//! - every other step (`first()`, `getReferenceKey()`, names starting with an upper-case
//!   letter, …) navigates.

use super::fhirpath::{Step, choice_suffix_type, fhir_type_is, has_specialisations};
use super::json::{Json, JsonObject, bytes_eq};

/// Most children one dispatch serves (one bit each in a `u64`).
pub(crate) const MAX_CHILDREN: usize = 64;
/// Fewest member children for which a dispatch is worth its scan.
const MIN_MEMBERS: usize = 2;

/// What one child of the trie node reads, as the scan sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Role {
    /// Navigated on its own.
    Navigate,
    /// The member of that exact name.
    Member,
    /// The choice element `nameT`, typed `T`.
    Typed(&'static str),
}

/// A name the scan looks for, and the children it concerns.
#[derive(Debug)]
struct Name {
    bytes: Box<[u8]>,
    /// The [`Role::Member`] child reading this name.
    member: Option<u8>,
    /// The [`Role::Typed`] child whose choice element this is (`valueQuantity`).
    typed: Option<u8>,
    /// [`Role::Member`] children (bit per child) reading this name (`value`): a key that is
    /// this name followed by an upper-case letter may be one of its choice elements, which
    /// navigation to `value` returns when the member itself is absent.
    base_of: u64,
    /// [`Role::Typed`] children whose base name this is and whose type `T` has
    /// specialisations (`value.ofType(string)`), with `T`: a choice element of this name whose
    /// type is a specialisation of `T` (`valueCode`) is one of the child's values.
    special_of: Vec<(u64, &'static str)>,
    /// [`Role::Typed`] children whose base name this is: the key itself being present means the
    /// child must navigate (`value.ofType(T)` over a plain `value` member).
    plain_of: u64,
}

/// The compiled scan for the children of one trie node; see the [module docs](self).
#[derive(Debug)]
pub(crate) struct MemberDispatch {
    roles: Vec<Role>,
    names: Vec<Name>,
    /// Open table of `names` indices ([`EMPTY`] when free), indexed by the top bits of
    /// [`key_hash`]; no two names share a slot.
    table: Box<[u16]>,
    seed: u64,
    shift: u32,
    /// Bit `n` set when some base name has `n` bytes: the prefixes of a key worth looking up.
    base_lens: u64,
    /// Children that may need a visit whatever the scan finds: those that navigate on their
    /// own ([`Role::Navigate`]) and those whose caller said so ([`MemberDispatch::keep`]).
    always: u64,
}

const EMPTY: u16 = u16::MAX;

/// What the scan found for the children of a node.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Scan {
    /// Children whose member was found (its value is in the scan's slot for the child).
    pub(super) present: u64,
    /// Children that must navigate on their own.
    pub(super) navigate: u64,
}

/// How one child gets its values after a [`MemberDispatch::scan`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Resolved<'a> {
    /// This member's value (flattened as navigation does), typed when the step was `ofType`.
    Found(Json<'a>, Option<&'static str>),
    /// No values.
    Absent,
    /// Navigate as without a dispatch.
    Navigate,
}

impl MemberDispatch {
    /// The dispatch for trie children taking `steps`, in child order; `None` when too few of
    /// them read members (or too many children), or their names defeat the hash.
    pub(crate) fn new<'s>(steps: impl ExactSizeIterator<Item = &'s Step>) -> Option<Self> {
        if steps.len() > MAX_CHILDREN {
            return None;
        }
        let mut roles = Vec::with_capacity(steps.len());
        let mut names: Vec<Name> = Vec::new();
        fn name_at(names: &mut Vec<Name>, bytes: &[u8]) -> usize {
            if let Some(i) = names.iter().position(|n| *n.bytes == *bytes) {
                return i;
            }
            names.push(Name {
                bytes: bytes.into(),
                member: None,
                typed: None,
                base_of: 0,
                special_of: Vec::new(),
                plain_of: 0,
            });
            names.len() - 1
        }
        for (i, step) in steps.enumerate() {
            let bit = 1u64 << i;
            let role = match step {
                Step::Member(name) if starts_lower(name) => {
                    let n = name_at(&mut names, name.as_bytes());
                    names[n].member = Some(i as u8);
                    names[n].base_of |= bit;
                    Role::Member
                }
                Step::TypedMember(name, ty) if starts_lower(name) => match ty.fhir {
                    Some(f) if !f.is_empty() => {
                        let mut key = name.as_bytes().to_vec();
                        key.push(f.as_bytes()[0].to_ascii_uppercase());
                        key.extend_from_slice(&f.as_bytes()[1..]);
                        let k = name_at(&mut names, &key);
                        if names[k].typed.is_some() {
                            // Two children read one choice element (`value.ofType(Quantity)`
                            // and `value.ofType(FHIR.Quantity)`): a name serves one of them.
                            return None;
                        }
                        names[k].typed = Some(i as u8);
                        let b = name_at(&mut names, name.as_bytes());
                        if has_specialisations(f) {
                            names[b].special_of.push((bit, f));
                        }
                        names[b].plain_of |= bit;
                        Role::Typed(f)
                    }
                    _ => Role::Navigate,
                },
                _ => Role::Navigate,
            };
            roles.push(role);
        }
        if roles.iter().filter(|r| **r != Role::Navigate).count() < MIN_MEMBERS
            || names.len() >= usize::from(EMPTY)
        {
            return None;
        }
        let base_lens = names
            .iter()
            .filter(|n| (n.base_of != 0 || !n.special_of.is_empty()) && n.bytes.len() < 64)
            .fold(0u64, |m, n| m | 1 << n.bytes.len());
        let always = roles
            .iter()
            .enumerate()
            .filter(|(_, r)| **r == Role::Navigate)
            .fold(0u64, |m, (i, _)| m | 1 << i);
        let mut bits = (names.len() * 2)
            .next_power_of_two()
            .trailing_zeros()
            .max(3);
        while bits <= 12 {
            for seed in 1..=512u64 {
                let shift = 64 - bits;
                let mut table = vec![EMPTY; 1 << bits].into_boxed_slice();
                let clash = names.iter().enumerate().any(|(i, n)| {
                    let slot = &mut table[(key_hash(&n.bytes, seed) >> shift) as usize];
                    let taken = *slot != EMPTY;
                    *slot = i as u16;
                    taken
                });
                if !clash {
                    return Some(MemberDispatch {
                        roles,
                        names,
                        table,
                        seed,
                        shift,
                        base_lens,
                        always,
                    });
                }
            }
            bits += 1;
        }
        None
    }

    #[inline]
    fn find(&self, key: &[u8]) -> Option<&Name> {
        let i = self.table[(key_hash(key, self.seed) >> self.shift) as usize];
        let n = self.names.get(usize::from(i))?;
        bytes_eq(&n.bytes, key).then_some(n)
    }

    /// Scan `object`'s members once, writing the member each [`Role::Member`] / [`Role::Typed`]
    /// child reads into `found[child]` (the first one, if a key is repeated, as navigation
    /// does). `found` must have a slot per child; slots of children not found are left as they
    /// are.
    pub(crate) fn scan<'a>(&self, object: JsonObject<'a>, found: &mut [Option<Json<'a>>]) -> Scan {
        let mut s = Scan::default();
        for (key, value) in object.raw_members() {
            if let Some(n) = self.find(key) {
                for c in [n.member, n.typed].into_iter().flatten() {
                    let bit = 1u64 << c;
                    if s.present & bit == 0 {
                        s.present |= bit;
                        found[usize::from(c)] = Some(value);
                    }
                }
                s.navigate |= n.plain_of;
            }
            // A possible choice element `nameType` of a base name read here: only the
            // prefixes as long as some base name, followed by an upper-case letter.
            let below = if key.len() >= 64 {
                u64::MAX
            } else {
                (1u64 << key.len()) - 1
            };
            let mut lens = self.base_lens & below & !1;
            while lens != 0 {
                let i = lens.trailing_zeros() as usize;
                lens &= lens - 1;
                if key[i].is_ascii_uppercase()
                    && let Some(n) = self.find(&key[..i])
                {
                    s.navigate |= n.base_of;
                    if !n.special_of.is_empty()
                        && let Some(actual) = std::str::from_utf8(&key[i..])
                            .ok()
                            .and_then(choice_suffix_type)
                    {
                        for &(bit, wanted) in &n.special_of {
                            if fhir_type_is(actual, wanted) {
                                s.navigate |= bit;
                            }
                        }
                    }
                }
            }
        }
        s
    }

    /// How child `i` gets its values after `scan` (with `found` as filled by it).
    #[inline]
    pub(crate) fn resolve<'a>(
        &self,
        i: usize,
        scan: Scan,
        found: &[Option<Json<'a>>],
    ) -> Resolved<'a> {
        let bit = 1u64 << i;
        match self.roles[i] {
            Role::Navigate => Resolved::Navigate,
            role if scan.present & bit != 0 => match found[i] {
                Some(v) => Resolved::Found(
                    v,
                    if let Role::Typed(f) = role {
                        Some(f)
                    } else {
                        None
                    },
                ),
                None => Resolved::Navigate,
            },
            _ if scan.navigate & bit != 0 => Resolved::Navigate,
            _ => Resolved::Absent,
        }
    }

    /// Also visit the children of `bits` when [`Resolved::Absent`] (the others are skipped then:
    /// see [`MemberDispatch::visits`]).
    pub(crate) fn keep(mut self, bits: u64) -> Self {
        self.always |= bits;
        self
    }

    /// The children to resolve after `scan`, a bit each: every child except the
    /// [`Resolved::Absent`] ones not [kept](MemberDispatch::keep), so that a walk over the
    /// children costs nothing for the many optional members a resource lacks.
    #[inline]
    pub(crate) fn visits(&self, scan: Scan) -> u64 {
        self.always | scan.present | scan.navigate
    }

    /// Number of children the dispatch was compiled for.
    pub(crate) fn len(&self) -> usize {
        self.roles.len()
    }
}

/// Whether a [`MemberDispatch`] finds what `step` reads in its scan (a member, or a choice
/// element); the other steps navigate on their own.
pub(crate) fn scanned(step: &Step) -> bool {
    match step {
        Step::Member(name) => starts_lower(name),
        Step::TypedMember(name, ty) => starts_lower(name) && ty.fhir.is_some_and(|f| !f.is_empty()),
        _ => false,
    }
}

fn starts_lower(name: &str) -> bool {
    name.starts_with(|c: char| !c.is_ascii_uppercase())
}

/// A hash of a member name from its length and its first and last eight bytes (names that
/// agree on all three share every slot whatever the seed; such a dispatch is not built).
/// Shorter names are read as two overlapping 4-byte words, or three single bytes, which cover
/// every byte too: copying a short name into a zeroed 8-byte buffer first would be a
/// variable-length copy whose bytes the following 8-byte load must wait for (a failed
/// store-to-load forward, ~12% of the scan's time).
#[inline]
fn key_hash(k: &[u8], seed: u64) -> u64 {
    let n = k.len();
    let word = |at: usize| u64::from_le_bytes(k[at..at + 8].try_into().expect("8 bytes"));
    let half = |at: usize| {
        u64::from(u32::from_le_bytes(
            k[at..at + 4].try_into().expect("4 bytes"),
        ))
    };
    let (head, tail) = match n {
        8.. => (word(0), word(n - 8)),
        4..8 => (half(0) | half(n - 4) << 32, 0),
        1..4 => (
            u64::from(k[0]) | u64::from(k[n / 2]) << 8 | u64::from(k[n - 1]) << 16,
            0,
        ),
        0 => (0, 0),
    };
    let a = (head ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let b = (tail ^ n as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    a ^ b.rotate_left(29) ^ (a >> 29)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::fhirpath::{Item, TypeSpec, navigate, navigate_typed};
    use crate::view::json::{JsonDoc, JsonRef};

    fn typed(name: &str, ty: &'static str) -> Step {
        Step::TypedMember(
            name.into(),
            TypeSpec {
                namespace: None,
                name: ty.into(),
                fhir: Some(ty),
                system: None,
            },
        )
    }

    /// Every child resolves to what navigating on its own gives, over objects with exact
    /// members, choice elements, both, repeats, nulls and arrays.
    #[test]
    fn a_scan_gives_what_navigation_gives() {
        let steps = vec![
            Step::Member("value".into()),
            typed("value", "Quantity"),
            typed("value", "string"),
            Step::Member("status".into()),
            Step::Member("code".into()),
            Step::First,
            Step::Member("Observation".into()),
            typed("effective", "Period"),
            Step::Member("valueQuantity".into()),
            typed("value", "boolean"),
            typed("value", "integer"),
            typed("value", "uri"),
            typed("value", "dateTime"),
            typed("value", "CodeableConcept"),
            typed("effective", "dateTime"),
        ];
        let kept = 1 << 3 | 1 << 9;
        let d = MemberDispatch::new(steps.iter())
            .expect("a dispatch")
            .keep(kept);
        let docs = [
            r#"{"status":"final","code":{"text":"x"},"valueQuantity":{"value":1}}"#,
            r#"{"value":3,"valueQuantity":{"value":1},"valueString":"s"}"#,
            r#"{"valueString":"a","valueMarkdown":"b","status":null}"#,
            r#"{"status":"a","status":"b","code":[{"t":1},null,{"t":2}]}"#,
            r#"{"effectivePeriod":{"start":"2020"},"effectiveDateTime":"2020"}"#,
            r#"{"effective":{"start":"2020"},"resourceType":"Observation"}"#,
            r#"{"valueBoolean":true,"valueInteger":2,"vaLue":1,"Value":2}"#,
            r#"{"valueMarkdown":"m","valueAge":{"value":1},"effectiveInstant":"2020"}"#,
            r#"{"value":{"value":1},"effective":"x","effectiveDateTime":"y"}"#,
            r#"{"valueQuantity":{"value":1},"effectiveDateTime":"2020"}"#,
            r#"{"valueCode":"c","effectivePeriod":{"end":"2020"}}"#,
            r#"{"valuePositiveInt":3,"valueUnsignedInt":[1,null,2]}"#,
            r#"{"valueUrl":"http://x","valueCanonical":"c","valueOid":"urn:oid:1"}"#,
            r#"{"valueAge":{"value":2},"valueDuration":{"value":3},"valueFoo":1}"#,
            r#"{"valueDateTime":"2020","valueBoolean":false,"effectiveDateTime":null}"#,
            r#"{"valueId":"i","valueMarkdown":"m","value":null}"#,
            r#"{}"#,
        ];
        for text in docs {
            let doc = JsonDoc::parse(text).expect("json");
            let root = doc.root();
            let JsonRef::Object(obj) = root.kind() else {
                panic!("object")
            };
            let mut found = vec![None; d.len()];
            let scan = d.scan(obj, &mut found);
            let item = Item::Json {
                value: root,
                fhir_type: None,
            };
            // The walk resolves only the children `visits` names: every other one is absent,
            // and the kept ones and those that navigate on their own are always named.
            let visits = d.visits(scan);
            assert_eq!(visits & kept, kept, "{text}");
            for (i, step) in steps.iter().enumerate() {
                if visits & 1 << i == 0 {
                    assert!(
                        matches!(d.resolve(i, scan, &found), Resolved::Absent),
                        "{text} {i}"
                    );
                } else if let Step::First | Step::Member(_) = step
                    && matches!(d.roles[i], Role::Navigate)
                {
                    assert!(matches!(d.resolve(i, scan, &found), Resolved::Navigate));
                }
            }
            for (i, step) in steps.iter().enumerate() {
                let mut want = Vec::new();
                match step {
                    Step::Member(n) => navigate(&item, n, &mut want),
                    Step::TypedMember(n, t) => navigate_typed(&item, n, t, &mut want),
                    _ => continue,
                }
                let got = match d.resolve(i, scan, &found) {
                    Resolved::Navigate => continue,
                    Resolved::Absent => Vec::new(),
                    Resolved::Found(v, t) => match v.kind() {
                        JsonRef::Null => Vec::new(),
                        JsonRef::Array(a) => a
                            .iter()
                            .filter(|x| !x.is_null())
                            .map(|value| Item::Json {
                                value,
                                fhir_type: t,
                            })
                            .collect(),
                        _ => vec![Item::Json {
                            value: v,
                            fhir_type: t,
                        }],
                    },
                };
                assert_eq!(format!("{got:?}"), format!("{want:?}"), "{text} {step:?}");
            }
        }
    }

    /// One choice element settles the children of the other types without navigating, unless
    /// its type is a specialisation of theirs.
    #[test]
    fn a_choice_element_settles_the_other_types() {
        let steps = [
            typed("value", "Quantity"),
            typed("value", "string"),
            typed("value", "boolean"),
            typed("value", "CodeableConcept"),
            typed("effective", "dateTime"),
            typed("effective", "Period"),
        ];
        let d = MemberDispatch::new(steps.iter()).expect("a dispatch");
        let resolve = |text: &str| {
            let doc = JsonDoc::parse(text).expect("json");
            let JsonRef::Object(obj) = doc.root().kind() else {
                panic!("object")
            };
            let mut found = vec![None; d.len()];
            let scan = d.scan(obj, &mut found);
            (0..steps.len())
                .map(|i| match d.resolve(i, scan, &found) {
                    Resolved::Found(..) => 'F',
                    Resolved::Absent => '-',
                    Resolved::Navigate => 'N',
                })
                .collect::<String>()
        };
        assert_eq!(
            resolve(r#"{"valueQuantity":{"value":1},"effectiveDateTime":"2020"}"#),
            "F---F-"
        );
        // A code is a string, an Age a Quantity: those navigate (and find them).
        assert_eq!(resolve(r#"{"valueCode":"c"}"#), "-N----");
        assert_eq!(resolve(r#"{"valueAge":{"value":1}}"#), "N-----");
        // The plain member: every child of that name navigates.
        assert_eq!(resolve(r#"{"value":1,"effectivePeriod":{}}"#), "NNNN-F");
    }

    #[test]
    fn names_that_defeat_the_hash_or_too_few_members_build_no_dispatch() {
        assert!(MemberDispatch::new([Step::Member("a".into()), Step::First].iter()).is_none());
        let same_ends = [
            Step::Member("abcdefgh_one_ijklmnop".into()),
            Step::Member("abcdefgh_two_ijklmnop".into()),
        ];
        assert!(MemberDispatch::new(same_ends.iter()).is_none());
        let many: Vec<Step> = (0..65).map(|i| Step::Member(format!("m{i}"))).collect();
        assert!(MemberDispatch::new(many.iter()).is_none());
        let ok: Vec<Step> = (0..64)
            .map(|i| Step::Member(format!("member{i}")))
            .collect();
        assert!(MemberDispatch::new(ok.iter()).is_some());
    }
}
