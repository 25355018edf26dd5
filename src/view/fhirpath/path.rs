//! A fast path for the expressions views use most: member chains with `first()`, `ofType(T)`,
//! `getResourceKey()` and `getReferenceKey([T])` (`code.coding.first().system`,
//! `subject.getReferenceKey(Patient)`, `effective.ofType(Period).start`). Nine in ten columns
//! of the default views have this shape.
//!
//! The tree-walking evaluator allocates a collection per AST node and charges the work budget
//! for each; a [`PathPlan`] is the same chain as a flat list of steps run over two buffers, with
//! the same results (it calls the evaluator's own navigation and functions). None of these steps
//! can fail or do more work than the size of the resource, so no budget is needed.

use std::borrow::Cow;

use super::eval::{as_type, navigate, navigate_typed, primitive_meta_site};
use super::functions::{reference_key, resource_keys};
use super::parser::{EnvVar, Func, Node, TypeSpec};
use super::types::{Env, Item};

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Step {
    /// `.name`
    Member(String),
    /// `.first()`
    First,
    /// `.name.ofType(T)`: reads the choice element `nameT` directly.
    TypedMember(String, TypeSpec),
    /// `.ofType(T)` on anything else.
    OfType(TypeSpec),
    /// `.getReferenceKey([T])`
    ReferenceKey(Option<String>),
    /// `.getResourceKey()`
    ResourceKey,
    /// `.count()`
    Count,
    /// `%rowIndex` (only as the first step: it ignores its input)
    RowIndex,
}

/// A compiled member chain; see the [module docs](self).
#[derive(Clone, Debug)]
pub(crate) struct PathPlan {
    steps: Vec<Step>,
}

impl PathPlan {
    /// The plan of `node`, when it is a chain of supported steps.
    pub(crate) fn of(node: &Node) -> Option<PathPlan> {
        let mut steps = Vec::new();
        push_steps(node, &mut steps)?;
        (!steps.is_empty()).then_some(PathPlan { steps })
    }

    /// The steps, in order.
    pub(crate) fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// Evaluate over `focus`, as the tree-walking evaluator would.
    pub(crate) fn evaluate<'a>(&self, focus: &[Item<'a>], env: &Env<'a>) -> Vec<Item<'a>> {
        let mut out = Vec::new();
        self.evaluate_into(focus, env, &mut out, &mut Vec::new());
        out
    }

    /// [`PathPlan::evaluate`] appending to `out`, with `tmp` (left empty) as the second step
    /// buffer: when `out` starts empty the two trade places step by step and nothing is
    /// allocated once they have grown.
    pub(crate) fn evaluate_into<'a>(
        &self,
        focus: &[Item<'a>],
        env: &Env<'a>,
        out: &mut Vec<Item<'a>>,
        tmp: &mut Vec<Item<'a>>,
    ) {
        if !out.is_empty() {
            let mut fresh = Vec::new();
            self.evaluate_into(focus, env, &mut fresh, tmp);
            out.append(&mut fresh);
            return;
        }
        let mut cur = std::mem::take(out);
        let mut next = std::mem::take(tmp);
        let mut at_focus = true;
        for step in &self.steps {
            if let (Step::First, false) = (step, at_focus) {
                cur.truncate(1);
                continue;
            }
            let input: &[Item<'a>] = if at_focus { focus } else { &cur };
            next.clear();
            step.apply(input, env, &mut next);
            std::mem::swap(&mut cur, &mut next);
            at_focus = false;
        }
        next.clear();
        *out = cur;
        *tmp = next;
    }

    /// [`PathPlan::evaluate_into`] from the second step on, with `out` holding the values of
    /// the first (found some other way: a scan of the object the first step reads).
    pub(crate) fn evaluate_after_first<'a>(
        &self,
        env: &Env<'a>,
        out: &mut Vec<Item<'a>>,
        tmp: &mut Vec<Item<'a>>,
    ) {
        let mut cur = std::mem::take(out);
        let mut next = std::mem::take(tmp);
        for step in self.steps.iter().skip(1) {
            if let Step::First = step {
                cur.truncate(1);
                continue;
            }
            next.clear();
            step.apply(&cur, env, &mut next);
            std::mem::swap(&mut cur, &mut next);
        }
        next.clear();
        *out = cur;
        *tmp = next;
    }
}

impl Step {
    /// Whether the step yields nothing for no input (`getResourceKey()`, `count()` and
    /// `%rowIndex` yield a value regardless).
    pub(crate) fn keeps_empty(&self) -> bool {
        !matches!(self, Step::ResourceKey | Step::Count | Step::RowIndex)
    }

    /// Apply this step to `input`, appending the result to `out`.
    #[inline(always)]
    pub(crate) fn apply<'a>(&self, input: &[Item<'a>], env: &Env<'a>, out: &mut Vec<Item<'a>>) {
        match self {
            Step::Member(name) => {
                for item in input {
                    navigate(item, name, out);
                }
            }
            Step::First => out.extend(input.first().cloned()),
            Step::TypedMember(name, ty) => {
                for item in input {
                    navigate_typed(item, name, ty, out);
                }
            }
            Step::OfType(ty) => out.extend(input.iter().filter_map(|i| as_type(i, ty))),
            Step::ReferenceKey(ty) => out.extend(
                input
                    .iter()
                    .filter_map(|i| reference_key(i, ty.as_deref()))
                    .map(|id| Item::String(Cow::Borrowed(id))),
            ),
            Step::ResourceKey => resource_keys(input, env, out),
            Step::Count => out.push(Item::Integer(
                i64::try_from(input.len()).unwrap_or(i64::MAX),
            )),
            Step::RowIndex => out.push(Item::Integer(env.row_index)),
        }
    }
}

fn push_steps(node: &Node, steps: &mut Vec<Step>) -> Option<()> {
    let base = |b: &Option<Box<Node>>, steps: &mut Vec<Step>| match b {
        Some(b) => push_steps(b, steps),
        None => Some(()),
    };
    match node {
        Node::Member { base: b, name } => {
            if primitive_meta_site(name, b.as_deref()).is_some() {
                // `birthDate.extension` reads `_birthDate` too: the evaluator's.
                return None;
            }
            base(b, steps)?;
            steps.push(Step::Member(name.clone()));
        }
        Node::Call {
            base: b,
            func,
            args,
        } if args.is_empty() => match (func, b.as_deref()) {
            (
                Func::OfType(ty),
                Some(Node::Member {
                    base: member_base,
                    name,
                }),
            ) => {
                base(member_base, steps)?;
                steps.push(Step::TypedMember(name.clone(), ty.clone()));
            }
            (func, _) => {
                let step = match func {
                    Func::OfType(ty) => Step::OfType(ty.clone()),
                    Func::First => Step::First,
                    Func::GetReferenceKey(ty) => Step::ReferenceKey(ty.clone()),
                    Func::GetResourceKey => Step::ResourceKey,
                    Func::Count => Step::Count,
                    _ => return None,
                };
                base(b, steps)?;
                steps.push(step);
            }
        },
        Node::Var(EnvVar::RowIndex) => steps.push(Step::RowIndex),
        _ => return None,
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::super::{Constants, Expression, parser};
    use super::*;
    use crate::view::json::json_doc;

    /// `navigate_typed`'s one-pass scan gives what two scans give: the key `nameT` when
    /// present, else navigating to `name` (the plain member, else every choice element) and
    /// keeping the items of type T or a profile of it.
    #[test]
    fn typed_member_scan_matches_navigate_then_filter() {
        use super::super::eval::keep_of_type;
        let objects = [
            json_doc!({"valueQuantity": {"value": 1}, "valueString": "s"}),
            json_doc!({"valueAge": {"value": 2}, "valueString": "s"}),
            json_doc!({"value": "plain", "valueString": "s"}),
            json_doc!({"valueString": "s", "value": "plain"}),
            json_doc!({"value": {"value": 3}}),
            json_doc!({"valueQuantity": [{"value": 1}, null, {"value": 2}]}),
            json_doc!({"valueCode": "c", "valueBoolean": true}),
            json_doc!({"other": 1}),
            json_doc!({"valueQuantity": {"value": 1}, "value": {"value": 9}}),
        ];
        for obj in objects {
            let item = Item::json(obj);
            for t in [
                "Quantity",
                "string",
                "code",
                "boolean",
                "CodeableConcept",
                "integer",
            ] {
                let ty = parser::parse(&format!("ofType({t})"), &Constants::new())
                    .ok()
                    .and_then(|n| match n {
                        parser::Node::Call {
                            func: Func::OfType(ty),
                            ..
                        } => Some(ty),
                        _ => None,
                    })
                    .expect(t);
                let mut fast = Vec::new();
                navigate_typed(&item, "value", &ty, &mut fast);
                // The two-scan definition: the key `value` + T if present, else navigate and
                // filter.
                let mut slow = Vec::new();
                let direct = format!("value{}{}", t[..1].to_uppercase(), &t[1..]);
                match obj.get(&direct) {
                    Some(v) if !matches!(v.kind(), crate::view::json::JsonRef::Null) => {
                        navigate(&item, &direct, &mut slow);
                        for i in &mut slow {
                            if let Item::Json { fhir_type, .. } = i {
                                *fhir_type = ty.fhir;
                            }
                        }
                    }
                    _ => {
                        navigate(&item, "value", &mut slow);
                        keep_of_type(&mut slow, 0, &ty);
                    }
                }
                assert_eq!(format!("{fast:?}"), format!("{slow:?}"), "{obj:?} as {t}");
            }
        }
    }

    /// The plan and the tree-walking evaluator agree on every supported shape.
    #[test]
    fn plans_agree_with_the_evaluator() {
        let res = json_doc!({
            "resourceType": "Observation", "id": "o1",
            "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": "s1", "code": "c1"}, {"system": "s2", "code": "c2"}],
                     "text": "t"},
            "category": [{"coding": [{"code": "k1"}]}, {"coding": [{"code": "k2"}]}],
            "effectivePeriod": {"start": "2020-01-01", "end": "2020-02-01"},
            "valueQuantity": {"value": 1.50, "unit": "mg"},
            "component": [{"valueString": "a"}, {"valueInteger": 3}, {"code": {"text": "x"}}]
        });
        let env = Env {
            row_index: 3,
            ..Env::new(res)
        };
        let focus = [Item::json(res)];
        let mut planned = 0;
        for src in [
            "id",
            "code.coding.first().system",
            "code.coding.system",
            "code.text",
            "category.first().coding.first().code",
            "category.coding.code",
            "subject.getReferenceKey(Patient)",
            "subject.getReferenceKey(Group)",
            "subject.getReferenceKey()",
            "getResourceKey()",
            "code.getResourceKey()",
            "effective.ofType(Period).start",
            "effective.ofType(dateTime)",
            "value.ofType(Quantity).value",
            "component.value.ofType(string)",
            "component.value.ofType(integer)",
            "component.value",
            "missing.first()",
            "first()",
            "Observation.code.text",
            "component.code.first().text",
            "value.ofType(FHIR.Quantity).unit",
            "code.ofType(CodeableConcept).text",
            "%rowIndex",
            "component.count()",
            "missing.count()",
            "count()",
            "category.coding.count()",
        ] {
            let expr = Expression::compile(src, &Constants::new()).expect(src);
            let node = parser::parse(src, &Constants::new()).expect(src);
            let plan = PathPlan::of(&node).unwrap_or_else(|| panic!("{src} has a plan"));
            planned += 1;
            let fast = plan.evaluate(&focus, &env);
            let slow = expr.evaluate_tree(&focus, &env).expect(src);
            let show = |v: &[Item<'_>]| format!("{v:?}");
            assert_eq!(show(&fast), show(&slow), "{src}");
        }
        assert_eq!(planned, 28);
        for src in [
            "name.where(use = 'x')",
            "a | b",
            "%rowIndex + 1",
            "a[0]",
            "a.exists()",
        ] {
            let node = parser::parse(src, &Constants::new()).expect(src);
            assert!(PathPlan::of(&node).is_none(), "{src}");
        }
    }
}
