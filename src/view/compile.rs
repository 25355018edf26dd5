//! ViewDefinition → [`CompiledView`]: an Arrow schema plus a tree of compiled FHIRPath
//! expressions, validated once so that evaluation per resource does no parsing.
//!
//! Evaluation follows the SQL-on-FHIR processing algorithm: `where` filters the resource; each
//! select computes its foci (`forEach`, `forEachOrNull`, `repeat`, or the node itself), and for
//! every focus emits the Cartesian product of its parts (its own columns, each nested select,
//! and the concatenated `unionAll` branches).
//!
//! Four shortcuts keep that cheap without changing its result: the member-chain columns of a
//! select are compiled into a trie of steps, so a shared prefix (`code.coding.first()` under
//! `code_system`, `code` and `code_display`) is navigated once per focus; the members that a
//! trie node's children read from one object are found in one scan of its keys (`dispatch.rs`);
//! a nested select that yields exactly one row (no iteration, no `unionAll`) writes its
//! cells into the parent's row, since a product with one row changes nothing; and the product
//! of one parent row with a `forEach`'s rows fills the parent's cells into those rows rather
//! than copying both into new ones.
//!
//! Across the views of a resource type, the members they read from the resource's root (their
//! root-level columns, and the first member of each root-level `forEach` path) can be taken
//! from one scan of it for all of them (`root_scan.rs`, [`CompiledView::evaluate_given`]),
//! and a view skips the columns it is given from the base view's row without scanning for them.

use std::{borrow::Cow, collections::HashMap, mem::ManuallyDrop, sync::Arc};

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde_json::Value;

use super::json::{Json, JsonRef, json_ref};
use super::{
    ViewError,
    definition::{ColumnDef, Select, ViewDefinition},
    dispatch::{MemberDispatch, Resolved, scanned},
    fhirpath::{
        Constants, Env, Expression, Item, Literal, ParsedReference, Step, parse_reference,
        push_flat,
    },
    root_scan::{RootScan, RootSites, ScannedRoot},
    types::{Cell, ColumnType, Converted, convert},
};

/// Field metadata key holding the column's FHIR type (e.g. `decimal`).
pub const FHIR_TYPE_METADATA: &str = "fhir.type";

/// One output column.
#[derive(Debug, Clone)]
pub struct ColumnSpec {
    /// Column name.
    pub name: String,
    /// FHIR type code (declared, inferred, or `string`).
    pub fhir_type: String,
    /// Arrow storage type of one value.
    pub column_type: ColumnType,
    /// `true` for list columns.
    pub collection: bool,
    /// The FHIRPath source.
    pub path: String,
    /// Human description.
    pub description: Option<String>,
}

impl ColumnSpec {
    /// The Arrow field.
    pub fn field(&self) -> Field {
        let dt = self.column_type.data_type();
        let dt = if self.collection {
            DataType::List(Arc::new(Field::new("item", dt, true)))
        } else {
            dt
        };
        let mut md = HashMap::from([(FHIR_TYPE_METADATA.to_string(), self.fhir_type.clone())]);
        if let Some(d) = &self.description {
            md.insert("description".into(), d.clone());
        }
        Field::new(&self.name, dt, true).with_metadata(md)
    }
}

#[derive(Debug)]
enum Iteration {
    Once,
    ForEach(Expression),
    ForEachOrNull(Expression),
    Repeat(Vec<Expression>),
}

#[derive(Debug)]
struct SelectNode {
    iteration: Iteration,
    /// Columns whose paths are member chains, sharing their common prefixes.
    planned: Vec<TrieNode>,
    /// The members `planned` reads from the focus, found in one scan of it.
    planned_dispatch: Option<MemberDispatch>,
    /// [`column_bit`]s of every column of `planned`: when all of them are given ([`Given`]),
    /// the trie is not walked, nor the focus scanned (a child view's root columns are
    /// usually all copied from the base view's row).
    planned_mask: u64,
    /// The other columns, evaluated one by one.
    columns: Vec<(usize, Expression)>,
    /// No iteration, no `unionAll`, and every nested select simple too: the node yields exactly
    /// one row per focus, so its cells are written into the parent's row (no product).
    simple: bool,
    selects: Vec<SelectNode>,
    union_all: Vec<SelectNode>,
    /// Every column index this subtree sets.
    subtree: Vec<usize>,
    /// Columns whose path is `%rowIndex` (they are 0 in a forEachOrNull null row).
    row_index_cols: Vec<usize>,
    /// Its number among the view's root sites ([`CompiledView::root_sites`]), when its focus
    /// is the resource and it reads members of it: those of its trie's first level (no
    /// iteration), or the first member of its `forEach` path.
    site: Option<usize>,
}

/// A place where a view reads members of the resource's root object, which a [`RootScan`]
/// may serve: the first level of a member-chain trie evaluated on the resource (its steps, in
/// child order), or the first step of a `forEach`/`forEachOrNull` path over it.
#[derive(Debug)]
pub(crate) enum RootSite<'s> {
    Trie(Vec<&'s Step>),
    First(&'s Step),
}

/// One step of a trie of member-chain columns (`code.coding.first().system` and
/// `code.coding.first().code` share `code`, `coding`, `first()`): each distinct prefix of the
/// node's planned columns is navigated once per focus rather than once per column.
#[derive(Debug)]
struct TrieNode {
    step: Step,
    /// Columns whose path ends here.
    columns: Vec<usize>,
    children: Vec<TrieNode>,
    /// The members `children` read from each value of this step, found in one scan of it.
    dispatch: Option<MemberDispatch>,
    /// Over no input, this node and its children yield no values and only single-valued
    /// columns, whose cells stay null: the subtree is skipped (most optional elements are
    /// absent, and the chains below them would each be walked to set a null).
    skip_when_empty: bool,
    /// [`column_bit`]s of every column of this node and below: the subtree is skipped when
    /// all of them are given ([`Given`]).
    mask: u64,
}

impl TrieNode {
    fn insert(nodes: &mut Vec<TrieNode>, steps: &[Step], column: usize) {
        let Some((step, rest)) = steps.split_first() else {
            return;
        };
        let i = match nodes.iter().position(|n| n.step == *step) {
            Some(i) => i,
            None => {
                nodes.push(TrieNode {
                    step: step.clone(),
                    columns: Vec::new(),
                    children: Vec::new(),
                    dispatch: None,
                    skip_when_empty: false,
                    mask: 0,
                });
                nodes.len() - 1
            }
        };
        if rest.is_empty() {
            nodes[i].columns.push(column);
        } else {
            TrieNode::insert(&mut nodes[i].children, rest, column);
        }
    }

    /// Set [`TrieNode::skip_when_empty`] and the dispatches once the trie is complete
    /// (`columns` indexed as in the nodes); returns the dispatch of `nodes` themselves. A
    /// collection column is never skipped: its empty value is `[]`, not null.
    fn mark(nodes: &mut [TrieNode], columns: &[ColumnSpec]) -> Option<MemberDispatch> {
        for n in nodes.iter_mut() {
            n.dispatch = TrieNode::mark(&mut n.children, columns);
            n.skip_when_empty = n.step.keeps_empty()
                && n.columns.iter().all(|&c| !columns[c].collection)
                && n.children.iter().all(|c| c.skip_when_empty);
        }
        let keep = nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| !n.skip_when_empty)
            .fold(0u64, |m, (i, _)| m | 1 << (i % 64));
        MemberDispatch::new(nodes.iter().map(|n| &n.step)).map(|d| d.keep(keep))
    }
}

/// A row under construction: one cell per view column.
pub type Row<'a> = Vec<Cell<'a>>;

/// Item buffers an [`EvalScratch`] keeps between resources; more are freed.
const SPARE_ITEM_BUFFERS: usize = 64;
/// Largest buffer (in elements) an [`EvalScratch`] keeps between resources (64 Ki; a cell arena
/// of that size is 2 MiB). One huge resource grows the buffers it needs; they are freed after
/// it rather than held for the rest of the run.
const MAX_KEPT_LEN: usize = 1 << 16;

/// Allocations kept from resource to resource, so that evaluating views allocates nothing of
/// its own once they have grown (a fresh `Vec` per path step, per row and per product cost
/// about a tenth of the decoder's time):
///
/// - item buffers for the steps of member chains, and the references parsed so far (the views
///   of a type read the same ones: every Observation view reads `subject`);
/// - one arena of cells in which every row of the resource lives, as `width` consecutive cells
///   from a start index: a row is that index ([`RowId`]), and a product copies cells within the
///   arena. Its cells are `ManuallyDrop`, so that emptying it is free unless a cell that owns
///   memory (a computed string, a list) was stored, which `owned` records;
/// - lists of row ids, and a stack of the rows of nested selects waiting for their product.
///
/// Between resources the buffers are stored empty, so they borrow nothing.
/// [`EvalScratch::lend`] hands them out as [`EvalBuffers`] for one resource (a `'static`
/// element type shortens to any lifetime for free), and [`EvalScratch::restore`] takes them
/// back, emptied and relabelled `'static` in place (std collects `into_iter().map()` into the
/// same allocation when the element types have one layout). Each decode worker owns one.
#[derive(Debug, Default)]
pub struct EvalScratch {
    items: Vec<Vec<Item<'static>>>,
    refs: Vec<RefMemo<'static>>,
    found: Vec<Option<Json<'static>>>,
    root: Vec<Option<Json<'static>>>,
    cells: Vec<ManuallyDrop<Cell<'static>>>,
    lists: Vec<Vec<RowId>>,
    parts: Vec<Vec<RowId>>,
}

/// A row in an [`EvalBuffers`] arena: the index of its first cell.
pub type RowId = usize;

/// The buffers of an [`EvalScratch`] while one resource (lifetime `'a`) is evaluated.
#[derive(Debug, Default)]
pub struct EvalBuffers<'a> {
    pool: Pool<'a>,
    cells: Vec<ManuallyDrop<Cell<'a>>>,
    /// Some cell in `cells` owns memory (see [`Cell::owns_memory`]).
    owned: bool,
    lists: Vec<Vec<RowId>>,
    /// The rows of the nested selects of the foci being evaluated, innermost last (see
    /// [`CompiledView::nested_parts`]).
    parts: Vec<Vec<RowId>>,
    /// Values stored as the nearest value their column holds, or as null, since
    /// [`EvalScratch::lend`] (see [`EvalBuffers::inexact_cells`]).
    inexact: u64,
}

impl Drop for EvalBuffers<'_> {
    fn drop(&mut self) {
        clear_cells(&mut self.cells, self.owned);
    }
}

impl EvalScratch {
    /// A new, empty scratch.
    pub fn new() -> Self {
        Self::default()
    }

    /// The buffers, for evaluating one resource.
    pub fn lend<'a>(&mut self) -> EvalBuffers<'a> {
        EvalBuffers {
            pool: Pool {
                items: std::mem::take(&mut self.items),
                refs: std::mem::take(&mut self.refs),
                found: std::mem::take(&mut self.found),
                root: std::mem::take(&mut self.root),
            },
            cells: std::mem::take(&mut self.cells),
            owned: false,
            lists: std::mem::take(&mut self.lists),
            parts: std::mem::take(&mut self.parts),
            inexact: 0,
        }
    }

    /// Take the buffers back once the resource's rows have been used.
    pub fn restore(&mut self, mut b: EvalBuffers<'_>) {
        let mut refs = std::mem::take(&mut b.pool.refs);
        refs.clear();
        self.refs = emptied(refs);
        self.found = emptied(std::mem::take(&mut b.pool.found));
        self.root = emptied(std::mem::take(&mut b.pool.root));
        self.items = std::mem::take(&mut b.pool.items)
            .into_iter()
            .take(SPARE_ITEM_BUFFERS)
            .map(emptied)
            .collect();
        clear_cells(&mut b.cells, b.owned);
        self.cells = emptied(std::mem::take(&mut b.cells));
        self.lists = std::mem::take(&mut b.lists);
        // Empty after every evaluation (each focus gives its lists back, on errors too); kept
        // for its capacity.
        self.parts = std::mem::take(&mut b.parts);
        self.parts.clear();
        if self.cells.capacity() > MAX_KEPT_LEN {
            self.trim();
        }
    }

    /// Free the buffers one huge resource grew past `MAX_KEPT_LEN` elements, so that it does
    /// not hold their memory for the rest of the run. [`EvalScratch::restore`] does so when the
    /// cell arena grew that large; the decoder also after every long line (a resource can need
    /// large item buffers without many cells, e.g. `count()` over a big array).
    pub fn trim(&mut self) {
        if self.cells.capacity() > MAX_KEPT_LEN {
            self.cells = Vec::new();
        }
        self.items.retain(|v| v.capacity() <= MAX_KEPT_LEN);
        self.lists.retain(|l| l.capacity() <= MAX_KEPT_LEN);
    }
}

/// `v` emptied, with its element type relabelled (`Item<'a>` → `Item<'static>`) in `v`'s
/// allocation: std collects `into_iter().map()` (and `filter_map`) in place when both element
/// types have the same size and alignment, as one type with two lifetimes has
/// (`scratch_reuses_allocations` checks it).
fn emptied<T, U>(v: Vec<T>) -> Vec<U> {
    v.into_iter().filter_map(|_| None).collect()
}

/// Empty `cells`, dropping the cells when `owned` says some own memory (otherwise there is
/// nothing to drop, and clearing a vector of `ManuallyDrop` costs nothing).
fn clear_cells(cells: &mut Vec<ManuallyDrop<Cell<'_>>>, owned: bool) {
    if owned {
        for c in cells.drain(..) {
            drop(ManuallyDrop::into_inner(c));
        }
    }
    cells.clear();
}

impl<'a> EvalBuffers<'a> {
    /// Values converted inexactly since the buffers were lent: stored as the nearest value
    /// their native column holds, or as null (see [`crate::view::types`]). Counted once per
    /// converted value, in every view evaluated with these buffers (a cell that a `forEach`
    /// product copies into several rows counts once); the decoder adds it to its stats only
    /// when the resource is not rejected.
    pub fn inexact_cells(&self) -> u64 {
        self.inexact
    }

    /// Scan `resource`'s root once for every view of its type (see [`RootScan`]): pass
    /// [`ScannedRoot::view`] to each view's [`CompiledView::evaluate_given`] with these
    /// buffers. `None` when the resource is not an object.
    pub fn scan_root<'s>(
        &mut self,
        root: &'s RootScan,
        resource: Json<'a>,
    ) -> Option<ScannedRoot<'s>> {
        let JsonRef::Object(object) = json_ref(resource) else {
            return None;
        };
        let found = &mut self.pool.root;
        found.clear();
        found.resize(root.len(), None);
        let scan = root.dispatch.scan(object, found);
        Some(ScannedRoot { root, scan })
    }

    /// The `width` cells of row `id`.
    pub fn row(&self, id: RowId, width: usize) -> impl Iterator<Item = &Cell<'a>> + '_ {
        self.cells[id..id + width].iter().map(|c| &**c)
    }

    /// A new row of `width` null cells.
    fn new_row(&mut self, width: usize) -> RowId {
        let id = self.cells.len();
        self.cells
            .resize_with(id + width, || ManuallyDrop::new(Cell::Null));
        id
    }

    /// A new row with the cells of row `from`.
    fn copy_row(&mut self, from: RowId, width: usize) -> RowId {
        let id = self.cells.len();
        self.cells.extend_from_within(from..from + width);
        id
    }

    /// An empty list of rows.
    pub fn list(&mut self) -> Vec<RowId> {
        self.lists.pop().unwrap_or_default()
    }

    /// Give back a list of rows.
    pub fn put_list(&mut self, mut list: Vec<RowId>) {
        if list.capacity() > 0 {
            list.clear();
            self.lists.push(list);
        }
    }

    /// Give back the lists of [`Self::parts`] from `from` on.
    fn drop_parts(&mut self, from: usize) {
        while self.parts.len() > from {
            if let Some(p) = self.parts.pop() {
                self.put_list(p);
            }
        }
    }
}

/// What the steps of one resource share: item buffers, and the references parsed so far.
#[derive(Debug, Default)]
struct Pool<'a> {
    items: Vec<Vec<Item<'a>>>,
    /// `getReferenceKey` results by reference node: the views of a type ask for the same
    /// references (each Observation view reads `subject`), so each is parsed once per resource.
    /// At most [`MEMO_REFERENCES`], searched linearly.
    refs: Vec<RefMemo<'a>>,
    /// The members [`MemberDispatch::scan`]s found, one slot per trie child, a stack with the
    /// innermost node's slots last.
    found: Vec<Option<Json<'a>>>,
    /// The members the last [`EvalBuffers::scan_root`] found, one slot per union child.
    root: Vec<Option<Json<'a>>>,
}

/// References remembered per resource. A `forEach` over many references (a Group's members)
/// finds no repeats, so past this the rest are parsed each time rather than searched for.
const MEMO_REFERENCES: usize = 16;

/// A reference node ([`Json::identity`]) and what [`parse_reference`] made of it.
type RefMemo<'a> = ((usize, u32), Option<ParsedReference<'a>>);

impl<'a> Pool<'a> {
    #[inline]
    fn pop(&mut self) -> Vec<Item<'a>> {
        self.items.pop().unwrap_or_default()
    }

    #[inline]
    fn push(&mut self, mut v: Vec<Item<'a>>) {
        v.clear();
        self.items.push(v);
    }

    /// `getReferenceKey(ty)` over `input`, as [`Step::apply`] computes it, with each reference
    /// node parsed once per resource.
    fn reference_keys(&mut self, input: &[Item<'a>], ty: Option<&str>, out: &mut Vec<Item<'a>>) {
        for item in input {
            let parsed = match item {
                Item::Json { value, .. } => {
                    let id = value.identity();
                    match self.refs.iter().find(|(k, _)| *k == id) {
                        Some(&(_, p)) => p,
                        None => {
                            let p = parse_reference(item);
                            if self.refs.len() < MEMO_REFERENCES {
                                self.refs.push((id, p));
                            }
                            p
                        }
                    }
                }
                _ => None,
            };
            if let Some(key) = parsed.and_then(|p| p.key(ty)) {
                out.push(Item::String(Cow::Borrowed(key)));
            }
        }
    }
}

/// The cells of one row in the arena, and the arena's [`EvalBuffers::owned`] flag and
/// [`EvalBuffers::inexact`] count.
struct RowMut<'r, 'a> {
    cells: &'r mut [ManuallyDrop<Cell<'a>>],
    owned: &'r mut bool,
    inexact: &'r mut u64,
    /// [`column_bit`]s of the columns not to evaluate: their cells are copied in afterwards
    /// ([`Given`]).
    skip: u64,
}

impl<'a> RowMut<'_, 'a> {
    /// Set cell `c` of a row under construction, where every cell is set at most once (each
    /// column belongs to one node of the select tree), so the null it replaces has nothing to
    /// drop.
    #[inline]
    fn set(&mut self, c: usize, (cell, inexact): (Cell<'a>, u32)) {
        debug_assert!(matches!(*self.cells[c], Cell::Null), "cell {c} set twice");
        *self.owned |= cell.owns_memory();
        *self.inexact += u64::from(inexact);
        self.cells[c] = ManuallyDrop::new(cell);
    }

    /// [`RowMut::set`] for a [`plain_cell`]: exact, and owning no memory.
    #[inline]
    fn set_plain(&mut self, c: usize, cell: Cell<'a>) {
        debug_assert!(matches!(*self.cells[c], Cell::Null), "cell {c} set twice");
        debug_assert!(!cell.owns_memory());
        self.cells[c] = ManuallyDrop::new(cell);
    }
}

/// The bit of column `c` in a skip mask: columns from 63 on share the last bit, and are never
/// given (so a subtree holding one is never skipped).
#[inline]
fn column_bit(c: usize) -> u64 {
    1 << c.min(63)
}

/// The columns of a view that the base view of its type computes the same way at the resource
/// root (`getResourceKey()`, `subject.getReferenceKey(Patient)`, … which every child view of
/// the defaults repeats): with the base view's row of a resource at hand, their cells are
/// copied from it instead of being evaluated once per view ([`CompiledView::shared_root_columns`]).
#[derive(Debug, Clone, Default)]
pub struct SharedColumns {
    /// `(column of this view, column of the base view)`.
    copies: Vec<(usize, usize)>,
    /// [`column_bit`]s of the copied columns.
    mask: u64,
}

impl SharedColumns {
    /// Whether no column is shared.
    pub fn is_empty(&self) -> bool {
        self.copies.is_empty()
    }

    /// The shared cells of the base view's row `row`.
    pub fn given(&self, row: RowId) -> Given<'_> {
        Given { shared: self, row }
    }
}

/// Cells a view's root row takes from another row of the same resource
/// ([`CompiledView::evaluate_given`]).
#[derive(Debug, Clone, Copy)]
pub struct Given<'s> {
    shared: &'s SharedColumns,
    row: RowId,
}

/// Why one resource could not be evaluated (the resource is rejected, the run goes on).
#[derive(Debug, Clone, PartialEq)]
pub struct EvalError {
    /// View name.
    pub view: String,
    /// Column name or `where`/`forEach` locus.
    pub locus: String,
    /// What went wrong.
    pub message: String,
}

impl std::fmt::Display for EvalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "view `{}`, {}: {}", self.view, self.locus, self.message)
    }
}

/// A ViewDefinition compiled for evaluation.
#[derive(Debug)]
pub struct CompiledView {
    name: String,
    resource: String,
    description: Option<String>,
    columns: Vec<ColumnSpec>,
    wheres: Vec<Expression>,
    root: SelectNode,
    schema: SchemaRef,
    raw_column: bool,
    /// Member lookups through [`MemberDispatch`] (see [`CompiledView::set_member_dispatch`]).
    member_dispatch: bool,
}

impl CompiledView {
    /// Compile a parsed ViewDefinition. `origin` names the file in error messages.
    pub fn compile(def: &ViewDefinition, origin: &str) -> Result<CompiledView, ViewError> {
        let err = |message: String| ViewError::Invalid {
            origin: origin.to_string(),
            message,
        };
        let resource = def
            .resource
            .clone()
            .filter(|r| !r.is_empty())
            .ok_or_else(|| err("`resource` is required".into()))?;
        if !super::is_valid_resource_type(&resource) {
            return Err(err(format!(
                "`resource` {resource:?} is not a FHIR resource type name"
            )));
        }
        let name = def
            .name
            .clone()
            .unwrap_or_else(|| super::snake_case(&resource));
        if !super::is_sql_name(&name) {
            return Err(err(format!(
                "view name {name:?} must match ^[A-Za-z][A-Za-z0-9_]*$"
            )));
        }
        // Each view's table has a current-state twin `<name>_latest` beside it in a dataset.
        if let Some(of) = name
            .to_ascii_lowercase()
            .strip_suffix(crate::dataset::current::LATEST_SUFFIX)
        {
            return Err(err(format!(
                "view name {name:?} ends in `_latest`, which a dataset keeps for the \
                 current-state table of view {of:?}; rename the view"
            )));
        }
        if def.select.is_empty() {
            return Err(err("`select` must have at least one entry".into()));
        }
        let mut constants = Constants::new();
        for c in &def.constant {
            let lit = constant_literal(&c.name, &c.rest).map_err(err)?;
            constants.insert(&c.name, lit);
        }
        let mut cx = Compiler {
            origin,
            constants: &constants,
            columns: Vec::new(),
        };
        let wheres = def
            .where_
            .iter()
            .map(|w| cx.expr(&w.path, "where"))
            .collect::<Result<Vec<_>, _>>()?;
        let mut root = cx.select_list(&def.select, "")?;
        root.set_masks();
        root.number_root_sites(&mut 0);
        if cx.columns.is_empty() {
            return Err(err("the view defines no columns".into()));
        }
        let columns = cx.columns;
        let schema = Arc::new(Schema::new(
            columns.iter().map(ColumnSpec::field).collect::<Vec<_>>(),
        ));
        Ok(CompiledView {
            name,
            resource,
            description: def.description.clone(),
            columns,
            wheres,
            root,
            schema,
            raw_column: false,
            member_dispatch: true,
        })
    }

    /// The columns of this view that `base` (the base view of the same resource type) computes
    /// identically on the same focus, the resource: a single-valued string column at the root
    /// (or in a nested select without iteration) whose path, free of `%` variables, is the same
    /// text as such a column of `base`. A string conversion is always exact and a path the base
    /// view evaluated without error gives the same cell again, so copying it changes nothing.
    /// Empty when `base` may not yield exactly one row per resource (iteration or `unionAll`
    /// at its root).
    pub fn shared_root_columns(&self, base: &CompiledView) -> SharedColumns {
        let mut shared = SharedColumns::default();
        if self.resource != base.resource || !base.root.simple || std::ptr::eq(self, base) {
            return shared;
        }
        let shareable = |v: &CompiledView| -> Vec<usize> {
            let mut cols = Vec::new();
            v.root.root_focus_columns(&mut cols);
            cols.retain(|&c| {
                let spec = &v.columns[c];
                spec.column_type == ColumnType::Utf8
                    && !spec.collection
                    && !spec.path.contains('%')
                    && c < 63
            });
            cols
        };
        let theirs = shareable(base);
        for c in shareable(self) {
            let path = self.columns[c].path.trim();
            if let Some(&from) = theirs
                .iter()
                .find(|&&b| base.columns[b].path.trim() == path)
            {
                shared.copies.push((c, from));
                shared.mask |= column_bit(c);
            }
        }
        shared
    }

    /// Parse and compile ViewDefinition JSON text.
    pub fn from_json(text: &str, origin: &str) -> Result<CompiledView, ViewError> {
        let def: ViewDefinition = serde_json::from_str(text).map_err(|e| ViewError::Invalid {
            origin: origin.to_string(),
            message: format!("not a ViewDefinition: {e}"),
        })?;
        Self::compile(&def, origin)
    }

    /// Rename the view's table, bypassing the SQL-name rule: for flatfhir's own tables
    /// (`_deleted`, `_outcomes`), whose leading `_` no user view can take.
    pub(crate) fn set_table_name(&mut self, name: &str) {
        self.name = name.to_string();
    }

    /// Add a trailing `resource` column holding the raw JSON of the resource.
    pub fn set_raw_column(&mut self, raw: bool) {
        if raw != self.raw_column {
            self.raw_column = raw;
            let mut fields: Vec<Field> = self.columns.iter().map(ColumnSpec::field).collect();
            if raw {
                fields.push(raw_field());
            }
            self.schema = Arc::new(Schema::new(fields));
        }
    }

    /// The places where the view reads members of the resource's root object, by the number
    /// its select nodes know them by: what a [`RootScan`] of the view's type serves.
    pub(crate) fn root_sites(&self) -> Vec<RootSite<'_>> {
        let mut out = Vec::new();
        self.root.root_sites(&mut out);
        out
    }

    /// Find the members a trie node reads with one scan of each object (default) rather than
    /// one scan per member. The results are the same; the switch exists so that tests can
    /// compare the two.
    #[doc(hidden)]
    pub fn set_member_dispatch(&mut self, on: bool) {
        self.member_dispatch = on;
    }

    /// View (table) name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The resource type it reads.
    pub fn resource(&self) -> &str {
        &self.resource
    }
    /// Description, if any.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }
    /// The columns computed from FHIRPath (without the raw `resource` column).
    pub fn columns(&self) -> &[ColumnSpec] {
        &self.columns
    }
    /// Whether the raw `resource` column is appended.
    pub fn raw_column(&self) -> bool {
        self.raw_column
    }
    /// The output schema, including the raw column when enabled.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Evaluate one resource, appending its rows to `out`. Nothing is appended on error.
    /// Returns `false` when the resource was filtered out by `where`.
    pub fn evaluate<'a>(
        &self,
        resource: Json<'a>,
        out: &mut Vec<Row<'a>>,
    ) -> Result<bool, EvalError> {
        let mut bufs = EvalBuffers::default();
        let mut ids = Vec::new();
        let included = self.evaluate_with(resource, &mut ids, &mut bufs)?;
        let width = self.columns.len();
        out.extend(ids.iter().map(|&id| bufs.row(id, width).cloned().collect()));
        Ok(included)
    }

    /// [`CompiledView::evaluate`] with buffers reused across calls (see [`EvalScratch`]): the
    /// rows are appended to `out` as ids in `bufs`, each [`Self::columns`]`.len()` cells wide.
    pub fn evaluate_with<'a>(
        &self,
        resource: Json<'a>,
        out: &mut Vec<RowId>,
        bufs: &mut EvalBuffers<'a>,
    ) -> Result<bool, EvalError> {
        self.evaluate_given(resource, out, bufs, None, None)
    }

    /// [`CompiledView::evaluate_with`] where the cells `given` names are copied from a row
    /// already evaluated (another view's, in `bufs`) instead of being computed again, and the
    /// members of the resource's root that `root` names are taken from a [`RootScan`] of it
    /// (done with `bufs`, for this view among others) instead of being looked up again.
    pub fn evaluate_given<'a>(
        &self,
        resource: Json<'a>,
        out: &mut Vec<RowId>,
        bufs: &mut EvalBuffers<'a>,
        given: Option<Given<'_>>,
        root: Option<RootSites<'_>>,
    ) -> Result<bool, EvalError> {
        let env = Env {
            resource,
            row_index: 0,
        };
        let focus = [Item::Json {
            value: resource,
            fhir_type: None,
        }];
        for w in &self.wheres {
            let items = w
                .evaluate(&focus, &env)
                .map_err(|e| self.error("where", e))?;
            match truth(&items) {
                Ok(true) => {}
                Ok(false) => return Ok(false),
                Err(m) => return Err(self.error(&format!("where `{}`", w.source()), m)),
            }
        }
        let start = out.len();
        let mut computed = bufs.pool.pop();
        let r = self.process_foci(
            &self.root,
            &focus,
            &mut computed,
            0,
            resource,
            out,
            bufs,
            given,
            root,
        );
        bufs.pool.push(computed);
        if r.is_err() {
            // The rows stay in the arena until it is cleared, unreferenced.
            out.truncate(start);
        }
        r.map(|_| true)
    }

    fn error(&self, locus: &str, message: impl ToString) -> EvalError {
        EvalError {
            view: self.name.clone(),
            locus: locus.to_string(),
            message: message.to_string(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn process<'a>(
        &self,
        node: &SelectNode,
        focus: &Item<'a>,
        parent_index: i64,
        resource: Json<'a>,
        out: &mut Vec<RowId>,
        bufs: &mut EvalBuffers<'a>,
        root: Option<RootSites<'_>>,
    ) -> Result<(), EvalError> {
        let one = std::slice::from_ref(focus);
        let mut computed = bufs.pool.pop();
        let r = self.process_foci(
            node,
            one,
            &mut computed,
            parent_index,
            resource,
            out,
            bufs,
            None,
            root,
        );
        bufs.pool.push(computed);
        r
    }

    /// [`CompiledView::process`] with `computed` as the buffer for the node's foci, the
    /// cells `given` (the root's only) copied rather than evaluated, and the members of the
    /// resource that `root` holds (when `one` is the resource) taken from it.
    #[allow(clippy::too_many_arguments)]
    fn process_foci<'a>(
        &self,
        node: &SelectNode,
        one: &[Item<'a>],
        computed: &mut Vec<Item<'a>>,
        parent_index: i64,
        resource: Json<'a>,
        out: &mut Vec<RowId>,
        bufs: &mut EvalBuffers<'a>,
        given: Option<Given<'_>>,
        root: Option<RootSites<'_>>,
    ) -> Result<(), EvalError> {
        let width = self.columns.len();
        let env = Env {
            resource,
            row_index: parent_index,
        };
        let (foci, iterating) = match &node.iteration {
            Iteration::Once => (one, false),
            Iteration::ForEach(e) | Iteration::ForEachOrNull(e) => {
                let mut tmp = bufs.pool.pop();
                let first = match (root, node.site, e.plan()) {
                    (Some(r), Some(site), Some(plan)) if self.member_dispatch => {
                        r.first(site, &bufs.pool.root).map(|first| (first, plan))
                    }
                    _ => None,
                };
                let r = match first {
                    // The first member from the root scan, the rest of the path as usual.
                    Some((first, plan)) => {
                        match first {
                            Resolved::Found(v, ty) => push_flat(v, ty, computed),
                            Resolved::Absent => {}
                            Resolved::Navigate => plan.steps()[0].apply(one, &env, computed),
                        }
                        plan.evaluate_after_first(&env, computed, &mut tmp);
                        Ok(())
                    }
                    None => e.evaluate_into(one, &env, computed, &mut tmp),
                };
                bufs.pool.push(tmp);
                r.map_err(|m| self.error("forEach", m))?;
                (computed.as_slice(), true)
            }
            Iteration::Repeat(paths) => {
                self.repeat(paths, &one[0], &env, computed, 0)?;
                (computed.as_slice(), true)
            }
        };
        if foci.is_empty() {
            if let Iteration::ForEachOrNull(_) = node.iteration {
                let row = bufs.new_row(width);
                for &c in &node.row_index_cols {
                    *bufs.cells[row + c] = Cell::Int(0);
                }
                out.push(row);
            }
            return Ok(());
        }
        let nested_rows = node.selects.iter().any(|s| !s.simple) || !node.union_all.is_empty();
        // The nested selects of a node without iteration have its focus: the resource, when
        // the node's is.
        let root = root.filter(|_| matches!(node.iteration, Iteration::Once));
        for (i, f) in foci.iter().enumerate() {
            let index = if iterating { i as i64 } else { parent_index };
            let env = Env {
                resource,
                row_index: index,
            };
            // The nested selects first: when one yields no rows, neither does the focus, and
            // its own columns are not evaluated at all (most Observations have no `component`,
            // yet `observation_component` would read every one's id and subject).
            let parts = bufs.parts.len();
            if nested_rows {
                match self.nested_parts(node, f, index, resource, bufs, root) {
                    Ok(true) => {}
                    Ok(false) => {
                        bufs.drop_parts(parts);
                        continue;
                    }
                    Err(e) => {
                        bufs.drop_parts(parts);
                        return Err(e);
                    }
                }
            }
            let base = bufs.new_row(width);
            let mut first_error = None;
            let mut row = RowMut {
                cells: &mut bufs.cells[base..base + width],
                owned: &mut bufs.owned,
                inexact: &mut bufs.inexact,
                skip: given.map_or(0, |g| g.shared.mask),
            };
            self.fill_cells(
                node,
                f,
                &env,
                &mut row,
                &mut bufs.pool,
                &mut first_error,
                root,
            );
            if let Some((_, e)) = first_error {
                bufs.drop_parts(parts);
                return Err(e);
            }
            if let Some(g) = given {
                for &(c, from) in &g.shared.copies {
                    let cell = (*bufs.cells[g.row + from]).clone();
                    bufs.owned |= cell.owns_memory();
                    bufs.cells[base + c] = ManuallyDrop::new(cell);
                }
            }
            if !nested_rows {
                out.push(base);
                continue;
            }
            let mut acc = bufs.list();
            acc.push(base);
            let subtrees = node
                .selects
                .iter()
                .filter(|s| !s.simple)
                .map(|s| &s.subtree);
            let union = node.union_all.first().map(|u| &u.subtree);
            for (k, cols) in subtrees.chain(union).enumerate() {
                let part = std::mem::take(&mut bufs.parts[parts + k]);
                product(&mut acc, &part, cols, width, bufs);
                bufs.put_list(part);
            }
            bufs.parts.truncate(parts);
            out.extend_from_slice(&acc);
            bufs.put_list(acc);
        }
        Ok(())
    }

    /// Evaluate the nested selects and `unionAll` branches of `focus`, pushing the rows of each
    /// (one list per select, then one for all branches) on [`EvalBuffers::parts`]. `false` when
    /// one of them yields no rows, so that their product, and the focus's rows, are empty.
    fn nested_parts<'a>(
        &self,
        node: &SelectNode,
        focus: &Item<'a>,
        index: i64,
        resource: Json<'a>,
        bufs: &mut EvalBuffers<'a>,
        root: Option<RootSites<'_>>,
    ) -> Result<bool, EvalError> {
        for s in node.selects.iter().filter(|s| !s.simple) {
            let mut part = bufs.list();
            let r = self.process(s, focus, index, resource, &mut part, bufs, root);
            let empty = part.is_empty();
            bufs.parts.push(part);
            r?;
            if empty {
                return Ok(false);
            }
        }
        if !node.union_all.is_empty() {
            let mut part = bufs.list();
            let mut r = Ok(());
            for u in &node.union_all {
                r = self.process(u, focus, index, resource, &mut part, bufs, root);
                if r.is_err() {
                    break;
                }
            }
            let empty = part.is_empty();
            bufs.parts.push(part);
            r?;
            if empty {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Write the cells of `node`'s own columns and of its simple nested selects (which yield
    /// exactly one row each, so a product with them changes nothing) into `row`. Failures are
    /// noted in `first_error`, which keeps the first column in view order. `root` holds the
    /// members of the resource when `focus` is the resource.
    #[allow(clippy::too_many_arguments)]
    fn fill_cells<'a>(
        &self,
        node: &SelectNode,
        focus: &Item<'a>,
        env: &Env<'a>,
        row: &mut RowMut<'_, 'a>,
        pool: &mut Pool<'a>,
        first_error: &mut Option<(usize, EvalError)>,
        root: Option<RootSites<'_>>,
    ) {
        let one = std::slice::from_ref(focus);
        if node.planned_mask & !row.skip != 0 {
            let dispatch = node.planned_dispatch.as_ref();
            let site = root.zip(node.site);
            self.walk(
                &node.planned,
                dispatch,
                site,
                one,
                env,
                row,
                pool,
                first_error,
            );
        }
        for (c, expr) in &node.columns {
            if row.skip & column_bit(*c) != 0 {
                continue;
            }
            let mut items = pool.pop();
            let mut tmp = pool.pop();
            let cell = expr
                .evaluate_into(one, env, &mut items, &mut tmp)
                .map_err(|m| self.error(&format!("column `{}`", self.columns[*c].name), m))
                .and_then(|()| match plain_cell(&self.columns[*c], &items) {
                    Some(cell) => Ok((cell, 0)),
                    None => self.cell(*c, &items),
                });
            pool.push(items);
            pool.push(tmp);
            match cell {
                Ok(cell) => row.set(*c, cell),
                Err(e) => note_error(first_error, *c, e),
            }
        }
        for s in node.selects.iter().filter(|s| s.simple) {
            self.fill_cells(s, focus, env, row, pool, first_error, root);
        }
    }

    /// Evaluate a trie of member-chain columns over `input`, each shared prefix once. Over
    /// one object, the members the nodes read are found in one scan of it (`dispatch`), or
    /// taken from the [`RootScan`] of it, root site `site`, when that is given.
    #[allow(clippy::too_many_arguments)]
    fn walk<'a>(
        &self,
        nodes: &[TrieNode],
        dispatch: Option<&MemberDispatch>,
        site: Option<(RootSites<'_>, usize)>,
        input: &[Item<'a>],
        env: &Env<'a>,
        row: &mut RowMut<'_, 'a>,
        pool: &mut Pool<'a>,
        first_error: &mut Option<(usize, EvalError)>,
    ) {
        if self.member_dispatch
            && let (Some(d), [Item::Json { value, .. }]) = (dispatch, input)
            && let JsonRef::Object(object) = json_ref(value)
        {
            let start = pool.found.len();
            pool.found.resize(start + d.len(), None);
            let taken = site.and_then(|(r, s)| r.take(s, &pool.root, &mut pool.found[start..]));
            let scan = match taken {
                Some(scan) => scan,
                None => d.scan(object, &mut pool.found[start..]),
            };
            // Only the children that may set a cell: absent members that stay null are
            // skipped without a look at each.
            let mut todo = d.visits(scan);
            while todo != 0 {
                let i = todo.trailing_zeros() as usize;
                todo &= todo - 1;
                let Some(n) = nodes.get(i) else {
                    break;
                };
                if n.mask & !row.skip == 0 {
                    continue;
                }
                let (v, ty) = match d.resolve(i, scan, &pool.found[start..]) {
                    Resolved::Navigate => {
                        self.step(n, input, env, row, pool, first_error);
                        continue;
                    }
                    Resolved::Found(v, ty) if !v.is_null() => (v, ty),
                    Resolved::Found(..) | Resolved::Absent => {
                        if !n.skip_when_empty {
                            self.visit(n, &[], env, row, pool, first_error);
                        }
                        continue;
                    }
                };
                if let JsonRef::Array(_) = json_ref(v) {
                    let mut buf = pool.pop();
                    push_flat(v, ty, &mut buf);
                    self.visit(n, &buf, env, row, pool, first_error);
                    pool.push(buf);
                } else {
                    let one = [Item::Json {
                        value: v,
                        fhir_type: ty,
                    }];
                    self.visit(n, &one, env, row, pool, first_error);
                }
            }
            pool.found.truncate(start);
            return;
        }
        for n in nodes {
            if (input.is_empty() && n.skip_when_empty) || n.mask & !row.skip == 0 {
                continue;
            }
            self.step(n, input, env, row, pool, first_error);
        }
    }

    /// Apply `n`'s step to `input` and visit `n` with the result.
    #[inline]
    fn step<'a>(
        &self,
        n: &TrieNode,
        input: &[Item<'a>],
        env: &Env<'a>,
        row: &mut RowMut<'_, 'a>,
        pool: &mut Pool<'a>,
        first_error: &mut Option<(usize, EvalError)>,
    ) {
        if let Step::First = n.step {
            self.visit(n, &input[..input.len().min(1)], env, row, pool, first_error);
            return;
        }
        let mut buf = pool.pop();
        match &n.step {
            Step::ReferenceKey(ty) => pool.reference_keys(input, ty.as_deref(), &mut buf),
            step => step.apply(input, env, &mut buf),
        }
        self.visit(n, &buf, env, row, pool, first_error);
        pool.push(buf);
    }

    /// The cells of `n`'s columns and its children, for the values `items` of its step.
    #[inline]
    fn visit<'a>(
        &self,
        n: &TrieNode,
        items: &[Item<'a>],
        env: &Env<'a>,
        row: &mut RowMut<'_, 'a>,
        pool: &mut Pool<'a>,
        first_error: &mut Option<(usize, EvalError)>,
    ) {
        for &c in &n.columns {
            if row.skip & column_bit(c) != 0 {
                continue;
            }
            let spec = &self.columns[c];
            if let Some(cell) = plain_cell(spec, items) {
                row.set_plain(c, cell);
                continue;
            }
            match self.cell(c, items) {
                Ok(cell) => row.set(c, cell),
                Err(e) => note_error(first_error, c, e),
            }
        }
        if !n.children.is_empty() {
            let dispatch = n.dispatch.as_ref();
            self.walk(
                &n.children,
                dispatch,
                None,
                items,
                env,
                row,
                pool,
                first_error,
            );
        }
    }

    fn repeat<'a>(
        &self,
        paths: &[Expression],
        node: &Item<'a>,
        env: &Env<'a>,
        acc: &mut Vec<Item<'a>>,
        depth: usize,
    ) -> Result<(), EvalError> {
        if depth > MAX_REPEAT_DEPTH {
            return Err(self.error("repeat", format!("deeper than {MAX_REPEAT_DEPTH} levels")));
        }
        for p in paths {
            let children = p
                .evaluate(std::slice::from_ref(node), env)
                .map_err(|m| self.error("repeat", m))?;
            for c in children {
                acc.push(c.clone());
                self.repeat(paths, &c, env, acc, depth + 1)?;
            }
        }
        Ok(())
    }

    /// The cell of column `c` for the items its path returned, and how many of its values
    /// were converted inexactly. [`plain_cell`] gives the same for the common cases.
    fn cell<'a>(&self, c: usize, items: &[Item<'a>]) -> Result<(Cell<'a>, u32), EvalError> {
        let spec = &self.columns[c];
        let locus = || format!("column `{}`", spec.name);
        if spec.collection {
            let mut inexact = 0;
            let cells = items
                .iter()
                .map(|i| {
                    convert(i, spec.column_type).map(|c| {
                        inexact += u32::from(!c.exact);
                        c.cell
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|m| self.error(&locus(), m))?;
            return Ok((Cell::List(cells), inexact));
        }
        match items {
            [] => Ok((Cell::Null, 0)),
            [one] => convert(one, spec.column_type)
                .map(|Converted { cell, exact }| (cell, u32::from(!exact)))
                .map_err(|m| self.error(&locus(), m)),
            many => Err(self.error(
                &locus(),
                format!(
                    "path `{}` returned {} values but the column is not `collection: true`",
                    spec.path,
                    many.len()
                ),
            )),
        }
    }
}

/// The cell [`CompiledView::cell`] gives for the most common values, without going through
/// [`convert`] and its `Result`s: no value in a single-valued column (null), and a JSON string
/// or a borrowed string (a reference key) in a single-valued string column (the string, which
/// is always exact). `None` for anything else, errors included (several values in a
/// single-valued column), which the caller hands to [`CompiledView::cell`].
#[inline]
fn plain_cell<'a>(spec: &ColumnSpec, items: &[Item<'a>]) -> Option<Cell<'a>> {
    if spec.collection {
        return None;
    }
    match items {
        [] => Some(Cell::Null),
        [one] if matches!(spec.column_type, ColumnType::Utf8) => match one {
            Item::Json { value, .. } => match json_ref(value) {
                JsonRef::String(s) => Some(Cell::Str(Cow::Borrowed(s))),
                _ => None,
            },
            Item::String(Cow::Borrowed(s)) => Some(Cell::Str(Cow::Borrowed(s))),
            _ => None,
        },
        _ => None,
    }
}

/// Keep the error of the lowest column index (the first in view order).
fn note_error(first: &mut Option<(usize, EvalError)>, column: usize, e: EvalError) {
    if first.as_ref().is_none_or(|(c, _)| column < *c) {
        *first = Some((column, e));
    }
}

/// Maximum nesting followed by `repeat` before a resource is rejected.
pub const MAX_REPEAT_DEPTH: usize = 64;

/// The raw JSON column appended to base views.
pub fn raw_field() -> Field {
    Field::new("resource", DataType::Utf8, true).with_metadata(HashMap::from([
        (FHIR_TYPE_METADATA.to_string(), "json".to_string()),
        (
            "description".to_string(),
            "The resource as received (one ndjson line)".to_string(),
        ),
    ]))
}

/// Replace `acc` by its product with `part`: every row of `acc` once per row of `part`, with
/// the columns `cols` taken from the `part` row.
fn product(
    acc: &mut Vec<RowId>,
    part: &[RowId],
    cols: &[usize],
    width: usize,
    bufs: &mut EvalBuffers<'_>,
) {
    if let (&[a], &[p]) = (acc.as_slice(), part) {
        // One row each: move the part's cells into the row.
        for &c in cols {
            let cell = std::mem::replace(&mut *bufs.cells[p + c], Cell::Null);
            *bufs.cells[a + c] = cell;
        }
        return;
    }
    if let (&[a], Some((lo, hi))) = (acc.as_slice(), contiguous(cols)) {
        // One parent row (a focus and its `forEach`): each part row, null outside `cols`,
        // gets the parent's other cells and is a row of the product itself, so the part's own
        // cells are not copied at all (a `claim_item` row copies its 2 parent cells rather
        // than all 27 plus its 25 own).
        for &p in part {
            for c in (0..lo).chain(hi..width) {
                *bufs.cells[p + c] = Cell::clone(&bufs.cells[a + c]);
            }
        }
        acc.clear();
        acc.extend_from_slice(part);
        return;
    }
    let mut res = bufs.list();
    res.reserve(acc.len() * part.len());
    for &a in acc.iter() {
        for &p in part {
            let row = bufs.copy_row(a, width);
            for &c in cols {
                *bufs.cells[row + c] = Cell::clone(&bufs.cells[p + c]);
            }
            res.push(row);
        }
    }
    std::mem::swap(acc, &mut res);
    bufs.put_list(res);
}

/// `cols` as the range `lo..hi` when it is one (the columns of a subtree are numbered in
/// order).
fn contiguous(cols: &[usize]) -> Option<(usize, usize)> {
    let (&lo, &last) = (cols.first()?, cols.last()?);
    cols.windows(2)
        .all(|w| w[1] == w[0] + 1)
        .then_some((lo, last + 1))
}

/// FHIRPath truth of a `where` result: `[true]` / `[false]` / `[]` (false); anything else is an error.
fn truth(items: &[Item<'_>]) -> Result<bool, String> {
    match items {
        [] => Ok(false),
        [Item::Boolean(b)] => Ok(*b),
        [Item::Json { value, .. }] if matches!(json_ref(value), JsonRef::Bool(_)) => {
            Ok(matches!(json_ref(value), JsonRef::Bool(true)))
        }
        [other] => Err(format!(
            "must return a boolean, got {}",
            super::types::item_text(other)
        )),
        many => Err(format!(
            "must return a single boolean, got {} values",
            many.len()
        )),
    }
}

fn constant_literal(name: &str, rest: &serde_json::Map<String, Value>) -> Result<Literal, String> {
    if !super::is_sql_name(name) {
        return Err(format!(
            "constant name {name:?} must match ^[A-Za-z][A-Za-z0-9_]*$"
        ));
    }
    let (key, value) = rest
        .iter()
        .find(|(k, _)| k.starts_with("value"))
        .ok_or_else(|| format!("constant `{name}` has no value[x]"))?;
    let ty = &key["value".len()..];
    let fhir_type = {
        let mut c = ty.chars();
        match c.next() {
            Some(f) => f.to_lowercase().chain(c).collect::<String>(),
            None => return Err(format!("constant `{name}`: `value` needs a type suffix")),
        }
    };
    let bad = || format!("constant `{name}`: {key} has the wrong JSON type");
    Ok(match fhir_type.as_str() {
        "boolean" => Literal::Boolean(value.as_bool().ok_or_else(bad)?),
        "integer" | "positiveInt" | "unsignedInt" | "integer64" => Literal::Integer(
            value
                .as_i64()
                .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
                .ok_or_else(bad)?,
        ),
        "decimal" => match value {
            Value::Number(n) => Literal::Decimal(n.as_str().to_string()),
            Value::String(s) => Literal::Decimal(s.clone()),
            _ => return Err(bad()),
        },
        "date" => Literal::Date(value.as_str().ok_or_else(bad)?.to_string()),
        "dateTime" | "instant" => Literal::DateTime {
            fhir_type,
            value: value.as_str().ok_or_else(bad)?.to_string(),
        },
        "time" => Literal::Time(value.as_str().ok_or_else(bad)?.to_string()),
        _ => Literal::String {
            fhir_type,
            value: value.as_str().ok_or_else(bad)?.to_string(),
        },
    })
}

struct Compiler<'c> {
    origin: &'c str,
    constants: &'c Constants,
    columns: Vec<ColumnSpec>,
}

impl Compiler<'_> {
    fn err(&self, message: String) -> ViewError {
        ViewError::Invalid {
            origin: self.origin.to_string(),
            message,
        }
    }

    fn expr(&self, src: &str, locus: &str) -> Result<Expression, ViewError> {
        Expression::compile(src, self.constants).map_err(|e| self.err(format!("{locus}: {e}")))
    }

    /// A list of sibling selects behaves as one select with those nested selects. With an empty
    /// `locus` (the view's own list) the entries read `select[i]` in messages.
    fn select_list(&mut self, selects: &[Select], locus: &str) -> Result<SelectNode, ViewError> {
        let wrapper = Select {
            select: selects.to_vec(),
            ..Default::default()
        };
        self.select(&wrapper, locus)
    }

    fn select(&mut self, s: &Select, locus: &str) -> Result<SelectNode, ViewError> {
        let directives = [
            s.for_each.is_some(),
            s.for_each_or_null.is_some(),
            !s.repeat.is_empty(),
        ];
        if directives.iter().filter(|d| **d).count() > 1 {
            return Err(self.err(format!(
                "{locus}: at most one of forEach, forEachOrNull and repeat"
            )));
        }
        let iteration = if let Some(p) = &s.for_each {
            Iteration::ForEach(self.expr(p, &format!("{locus}.forEach"))?)
        } else if let Some(p) = &s.for_each_or_null {
            Iteration::ForEachOrNull(self.expr(p, &format!("{locus}.forEachOrNull"))?)
        } else if !s.repeat.is_empty() {
            Iteration::Repeat(
                s.repeat
                    .iter()
                    .map(|p| self.expr(p, &format!("{locus}.repeat")))
                    .collect::<Result<_, _>>()?,
            )
        } else {
            Iteration::Once
        };
        let first_col = self.columns.len();
        let mut columns = Vec::new();
        let mut planned = Vec::new();
        let mut row_index_cols = Vec::new();
        for c in &s.column {
            let idx = self.add_column(c, locus)?;
            if c.path.trim() == "%rowIndex" {
                row_index_cols.push(idx);
            }
            let expr = self.expr(&c.path, &format!("column `{}`", c.name))?;
            match expr.plan() {
                Some(plan) => TrieNode::insert(&mut planned, plan.steps(), idx),
                None => columns.push((idx, expr)),
            }
        }
        let planned_dispatch = TrieNode::mark(&mut planned, &self.columns);
        let mut selects = Vec::new();
        for (i, n) in s.select.iter().enumerate() {
            selects.push(self.select(n, &join_locus(locus, &format!("select[{i}]")))?);
        }
        let mut union_all = Vec::new();
        if !s.union_all.is_empty() {
            let before = self.columns.len();
            let first = self.select(&s.union_all[0], &format!("{locus}.unionAll[0]"))?;
            let first_columns: Vec<ColumnSpec> = self.columns[before..].to_vec();
            let names: Vec<String> = first_columns.iter().map(|c| c.name.clone()).collect();
            union_all.push(first);
            for (i, branch) in s.union_all.iter().enumerate().skip(1) {
                let mut sub = Compiler {
                    origin: self.origin,
                    constants: self.constants,
                    columns: Vec::new(),
                };
                let mut node = sub.select(branch, &format!("{locus}.unionAll[{i}]"))?;
                let bnames: Vec<&str> = sub.columns.iter().map(|c| c.name.as_str()).collect();
                if bnames != names {
                    return Err(self.err(format!(
                        "{locus}.unionAll[{i}]: branches must have the same columns in the same order \
                         (first branch: {names:?}, this branch: {bnames:?})"
                    )));
                }
                // One column holds every branch's values: a branch's values converted to the
                // first branch's type would be cut (a dateTime to its date) or refused.
                for (a, b) in first_columns.iter().zip(&sub.columns) {
                    if (a.column_type, a.collection) != (b.column_type, b.collection) {
                        let shown = |c: &ColumnSpec| {
                            format!(
                                "{}{}",
                                c.fhir_type,
                                if c.collection { " (collection)" } else { "" }
                            )
                        };
                        return Err(self.err(format!(
                            "{locus}.unionAll[{i}]: column `{}` is {} here but {} in the first \
                             branch; branches must have the same column types (give the column \
                             the same `type` in every branch)",
                            a.name,
                            shown(b),
                            shown(a)
                        )));
                    }
                }
                // Branch column indices are relative to `sub`; map them onto the first branch's.
                node.shift(before);
                union_all.push(node);
            }
        }
        let mut subtree: Vec<usize> = (first_col..self.columns.len()).collect();
        subtree.dedup();
        let simple = matches!(iteration, Iteration::Once)
            && union_all.is_empty()
            && selects.iter().all(|n: &SelectNode| n.simple);
        Ok(SelectNode {
            iteration,
            planned,
            planned_dispatch,
            planned_mask: 0,
            columns,
            simple,
            selects,
            union_all,
            subtree,
            row_index_cols,
            site: None,
        })
    }

    fn add_column(&mut self, c: &ColumnDef, locus: &str) -> Result<usize, ViewError> {
        if !super::is_sql_name(&c.name) {
            return Err(self.err(format!(
                "{locus}: column name {:?} must match ^[A-Za-z][A-Za-z0-9_]*$",
                c.name
            )));
        }
        if self.columns.iter().any(|x| x.name == c.name) {
            return Err(self.err(format!("{locus}: column `{}` is defined twice", c.name)));
        }
        let expr = self.expr(&c.path, &format!("column `{}`", c.name))?;
        let fhir_type = c
            .type_
            .clone()
            .map(|t| t.rsplit('/').next().unwrap_or(&t).to_string())
            .or_else(|| expr.result_type().map(str::to_string))
            .unwrap_or_else(|| "string".to_string());
        let mut column_type = ColumnType::for_fhir_type(&fhir_type);
        for t in &c.tag {
            if t.name == "ansi/type" {
                column_type = ColumnType::from_ansi(&t.value).ok_or_else(|| {
                    self.err(format!(
                        "column `{}`: unsupported ansi/type {:?}",
                        c.name, t.value
                    ))
                })?;
            }
        }
        self.columns.push(ColumnSpec {
            name: c.name.clone(),
            fhir_type,
            column_type,
            collection: c.collection,
            path: c.path.clone(),
            description: c.description.clone(),
        });
        Ok(self.columns.len() - 1)
    }
}

/// `parent.child`, or `child` at the top (empty parent).
fn join_locus(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_string()
    } else {
        format!("{parent}.{child}")
    }
}

impl SelectNode {
    /// The columns evaluated on this node's own focus: its own and those of its nested
    /// selects without iteration (their cells go into its row).
    fn root_focus_columns(&self, out: &mut Vec<usize>) {
        fn trie(nodes: &[TrieNode], out: &mut Vec<usize>) {
            for n in nodes {
                out.extend_from_slice(&n.columns);
                trie(&n.children, out);
            }
        }
        trie(&self.planned, out);
        out.extend(self.columns.iter().map(|(c, _)| *c));
        for s in self.selects.iter().filter(|s| s.simple) {
            s.root_focus_columns(out);
        }
    }

    /// Number the root sites of this node, whose focus is the resource, and of the nodes below
    /// with that focus, in pre-order from `next` (see [`SelectNode::site`]).
    fn number_root_sites(&mut self, next: &mut usize) {
        match &self.iteration {
            Iteration::Once => {
                if self.planned_dispatch.is_some() {
                    self.site = Some(*next);
                    *next += 1;
                }
                for n in self.selects.iter_mut().chain(self.union_all.iter_mut()) {
                    n.number_root_sites(next);
                }
            }
            Iteration::ForEach(e) | Iteration::ForEachOrNull(e) => {
                if e.plan()
                    .and_then(|p| p.steps().first())
                    .is_some_and(scanned)
                {
                    self.site = Some(*next);
                    *next += 1;
                }
            }
            Iteration::Repeat(_) => {}
        }
    }

    /// The root sites numbered by [`SelectNode::number_root_sites`], appended in number order.
    fn root_sites<'s>(&'s self, out: &mut Vec<RootSite<'s>>) {
        match (&self.iteration, self.site) {
            (Iteration::Once, site) => {
                if site.is_some() {
                    debug_assert_eq!(site, Some(out.len()));
                    out.push(RootSite::Trie(
                        self.planned.iter().map(|n| &n.step).collect(),
                    ));
                }
                for n in self.selects.iter().chain(self.union_all.iter()) {
                    n.root_sites(out);
                }
            }
            (Iteration::ForEach(e) | Iteration::ForEachOrNull(e), Some(site)) => {
                if let Some(first) = e.plan().and_then(|p| p.steps().first()) {
                    debug_assert_eq!(site, out.len());
                    out.push(RootSite::First(first));
                }
            }
            _ => {}
        }
    }

    /// Set every trie node's [`TrieNode::mask`] and the [`SelectNode::planned_mask`]s (once
    /// column indices are final).
    fn set_masks(&mut self) {
        fn trie(nodes: &mut [TrieNode]) -> u64 {
            let mut all = 0;
            for n in nodes {
                n.mask = n
                    .columns
                    .iter()
                    .fold(trie(&mut n.children), |m, &c| m | column_bit(c));
                all |= n.mask;
            }
            all
        }
        self.planned_mask = trie(&mut self.planned);
        for n in self.selects.iter_mut().chain(self.union_all.iter_mut()) {
            n.set_masks();
        }
    }

    /// Re-base column indices by `by` (used for unionAll branches compiled separately).
    fn shift(&mut self, by: usize) {
        for (c, _) in &mut self.columns {
            *c += by;
        }
        fn shift_trie(nodes: &mut [TrieNode], by: usize) {
            for n in nodes {
                for c in &mut n.columns {
                    *c += by;
                }
                shift_trie(&mut n.children, by);
            }
        }
        shift_trie(&mut self.planned, by);
        for c in self
            .subtree
            .iter_mut()
            .chain(self.row_index_cols.iter_mut())
        {
            *c += by;
        }
        for n in self.selects.iter_mut().chain(self.union_all.iter_mut()) {
            n.shift(by);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scratch_reuses_allocations() {
        // The scratch keeps its buffers across resources only if relabelling a vector's
        // lifetime reuses its allocation (std's in-place collection).
        let text = String::from("x");
        let mut cells: Vec<ManuallyDrop<Cell<'_>>> = Vec::with_capacity(100);
        cells.push(ManuallyDrop::new(Cell::Str(Cow::Borrowed(&text))));
        cells.push(ManuallyDrop::new(Cell::Str(Cow::Owned(text.clone()))));
        let ptr = cells.as_ptr() as usize;
        clear_cells(&mut cells, true);
        let kept: Vec<ManuallyDrop<Cell<'static>>> = emptied(cells);
        assert_eq!((kept.as_ptr() as usize, kept.capacity()), (ptr, 100));

        let view = CompiledView::from_json(
            &json!({"resource": "Patient", "select": [
                {"column": [{"name": "id", "path": "id"},
                            {"name": "all", "path": "name.family", "collection": true},
                            {"name": "org", "path": "managingOrganization.getReferenceKey()"},
                            {"name": "org2",
                             "path": "managingOrganization.getReferenceKey(Organization)"}]},
                {"forEach": "name", "column": [{"name": "family", "path": "family"}]}
            ]})
            .to_string(),
            "test",
        )
        .unwrap();
        let mut scratch = EvalScratch::new();
        let mut arenas = Vec::new();
        for n in 0..3 {
            let src = json!({"resourceType": "Patient", "id": format!("p{n}"),
                "name": [{"family": "a"}, {"family": "b"}],
                "managingOrganization": {"reference": "Organization/o1"}})
            .to_string();
            let doc = super::super::json::JsonDoc::parse(&src).unwrap();
            let mut bufs = scratch.lend();
            let mut ids = Vec::new();
            assert!(view.evaluate_with(doc.root(), &mut ids, &mut bufs).unwrap());
            let rows: Vec<Vec<Cell<'_>>> = ids
                .iter()
                .map(|&i| bufs.row(i, 5).cloned().collect())
                .collect();
            assert_eq!(rows.len(), 2);
            assert_eq!(rows[1][0], Cell::Str(Cow::Owned(format!("p{n}"))));
            let all = Cell::List(vec![Cell::Str("a".into()), Cell::Str("b".into())]);
            assert_eq!(rows[1][1], all);
            assert_eq!(rows[1][2], Cell::Str(Cow::Borrowed("o1")));
            assert_eq!(rows[1][3], Cell::Str(Cow::Borrowed("o1")));
            assert_eq!(rows[1][4], Cell::Str(Cow::Borrowed("b")));
            assert_eq!(bufs.pool.refs.len(), 1, "the reference is parsed once");
            assert!(bufs.owned, "the list cell owns memory");
            arenas.push(bufs.cells.as_ptr() as usize);
            scratch.restore(bufs);
        }
        assert_eq!(arenas[1], arenas[2], "the cell arena is reused");

        assert!(!scratch.items.is_empty() && scratch.cells.capacity() >= 4);
        assert!(scratch.refs.is_empty() && scratch.refs.capacity() > 0);

        // One huge resource: its buffers are freed afterwards, not kept for the run.
        let names: Vec<_> = (0..100_000)
            .map(|i| json!({"family": format!("f{i}")}))
            .collect();
        let src = json!({"resourceType": "Patient", "id": "big", "name": names}).to_string();
        let doc = super::super::json::JsonDoc::parse(&src).unwrap();
        let names_view = CompiledView::from_json(
            &json!({"resource": "Patient", "select": [
                {"forEach": "name", "column": [{"name": "family", "path": "family"}]}
            ]})
            .to_string(),
            "test",
        )
        .unwrap();
        let mut bufs = scratch.lend();
        let mut ids = Vec::new();
        names_view
            .evaluate_with(doc.root(), &mut ids, &mut bufs)
            .unwrap();
        assert_eq!(ids.len(), 100_000);
        scratch.restore(bufs);
        assert_eq!(scratch.cells.capacity(), 0);
        assert!(scratch.items.iter().all(|v| v.capacity() <= MAX_KEPT_LEN));
        assert!(scratch.lists.iter().all(|l| l.capacity() <= MAX_KEPT_LEN));
    }

    fn rows(
        view: serde_json::Value,
        res: serde_json::Value,
    ) -> Result<Vec<Vec<Cell<'static>>>, String> {
        let v = CompiledView::from_json(&view.to_string(), "test").map_err(|e| e.to_string())?;
        let res = super::super::json::leak_json(&res.to_string()).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        v.evaluate(res, &mut out).map_err(|e| e.to_string())?;
        Ok(out)
    }

    fn s(x: &str) -> Cell<'static> {
        Cell::Str(x.to_string().into())
    }

    /// Member-chain columns sharing prefixes (evaluated as a trie), simple nested selects
    /// (written into the parent row) and a forEach beside them give the rows the processing
    /// algorithm defines, and the first failing column in view order names the error.
    #[test]
    fn shared_prefixes_and_simple_selects() {
        let view = json!({"resource": "Observation", "select": [
            {"column": [
                {"name": "id", "path": "getResourceKey()"},
                {"name": "sys", "path": "code.coding.first().system"},
                {"name": "code", "path": "code.coding.first().code"},
                {"name": "codes", "path": "code.coding.code", "collection": true},
                {"name": "text", "path": "code.text"},
                {"name": "first_code", "path": "code.coding.code.first()"},
                {"name": "displays", "path": "code.coding.display"}
            ], "select": [
                {"column": [{"name": "start", "path": "effective.ofType(Period).start"}]},
                {"column": [{"name": "dt", "path": "effective.ofType(dateTime)"}]}
            ]},
            {"forEach": "component", "column": [
                {"name": "c_code", "path": "code.coding.first().code"},
                {"name": "c_text", "path": "code.text"}
            ]}
        ]});
        let o = json!({"resourceType": "Observation", "id": "o1",
            "code": {"coding": [{"system": "s", "code": "a"}, {"code": "b"}], "text": "t"},
            "effectivePeriod": {"start": "2020-01-01"},
            "component": [{"code": {"coding": [{"code": "x"}]}}, {"code": {"text": "y"}}]});
        let r = rows(view.clone(), o).unwrap();
        let list = |v: &[&str]| Cell::List(v.iter().map(|x| s(x)).collect());
        // The observation's own cells, then one (c_code, c_text) per component.
        let own = [
            s("o1"),
            s("s"),
            s("a"),
            list(&["a", "b"]),
            s("t"),
            s("a"),
            Cell::Null,
            s("2020-01-01"),
            Cell::Null,
        ];
        let row = |c: Cell<'static>, t: Cell<'static>| [&own[..], &[c, t]].concat();
        assert_eq!(r, vec![row(s("x"), Cell::Null), row(Cell::Null, s("y"))]);
        // Three failing columns (`text`, `displays`, `start`): the error names the first in view
        // order, though the trie reaches `displays` (under `code.coding`) first.
        let bad = json!({"resourceType": "Observation", "id": "o2",
            "code": {"coding": [{"code": "a", "display": "d1"}, {"display": "d2"}],
                     "text": ["t1", "t2"]},
            "effectivePeriod": {"start": ["x", "y"]},
            "component": [{"code": {"text": "c"}}]});
        let e = rows(view.clone(), bad.clone()).unwrap_err();
        assert!(e.contains("column `text`"), "{e}");
        // Without components the view yields no rows, so the failing columns are never read.
        let mut none = bad;
        none.as_object_mut().unwrap().remove("component");
        assert_eq!(rows(view, none).unwrap(), Vec::<Vec<Cell>>::new());
    }

    #[test]
    fn foreach_crossjoin_and_nulls() {
        let view = json!({"resource": "Patient", "select": [
            {"column": [{"name": "id", "path": "id"}]},
            {"forEachOrNull": "name", "column": [{"name": "family", "path": "family"}]},
            {"forEach": "telecom", "column": [{"name": "tel", "path": "value"}]}
        ]});
        let p = json!({"resourceType": "Patient", "id": "p1",
            "name": [{"family": "A"}, {"family": "B"}], "telecom": [{"value": "1"}, {"value": "2"}]});
        let r = rows(view.clone(), p).unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!(r[0], vec![s("p1"), s("A"), s("1")]);
        let p2 = json!({"resourceType": "Patient", "id": "p2", "telecom": [{"value": "9"}]});
        assert_eq!(
            rows(view, p2).unwrap(),
            vec![vec![s("p2"), Cell::Null, s("9")]]
        );
    }

    /// Chains under an absent element are skipped only where that leaves the same cells:
    /// `count()` is still 0, a collection still `[]`, `getResourceKey()` still the key.
    #[test]
    fn absent_elements_skip_only_what_stays_null() {
        let view = json!({"resource": "Patient", "select": [{"column": [
            {"name": "tel", "path": "telecom.value"},
            {"name": "org", "path": "managingOrganization.getReferenceKey()"},
            {"name": "given_n", "path": "name.given.count()"},
            {"name": "given", "path": "name.given", "collection": true},
            {"name": "family", "path": "name.first().family"},
            {"name": "key", "path": "link.other.getResourceKey()"}
        ]}]});
        let r = rows(view, json!({"resourceType": "Patient", "id": "p1"})).unwrap();
        assert_eq!(
            r,
            vec![vec![
                Cell::Null,
                Cell::Null,
                Cell::Int(0),
                Cell::List(vec![]),
                Cell::Null,
                s("p1"),
            ]]
        );
    }

    /// Two columns reading one choice element under two spellings of its type both get it
    /// (regression: the scan of the root found `valueQuantity` for only one of them).
    #[test]
    fn two_spellings_of_a_type_read_one_choice_element() {
        let view = json!({"resource": "Observation", "select": [{"column": [
            {"name": "v", "path": "value.ofType(Quantity).value", "type": "string"},
            {"name": "u", "path": "value.ofType(FHIR.Quantity).unit"},
            {"name": "st", "path": "status"}
        ]}]});
        let r = rows(
            view,
            json!({"valueQuantity": {"value": "1", "unit": "mg"}, "status": "f"}),
        );
        assert_eq!(r.unwrap(), vec![vec![s("1"), s("mg"), s("f")]]);
    }

    #[test]
    fn union_all_and_validation() {
        let view = json!({"resource": "Patient", "select": [{"column": [{"name": "id", "path": "id"}],
            "unionAll": [{"forEach": "address", "column": [{"name": "c", "path": "city"}]},
                         {"forEach": "contact.address", "column": [{"name": "c", "path": "city"}]}]}]});
        let p =
            json!({"id": "x", "address": [{"city": "a"}], "contact": [{"address": {"city": "b"}}]});
        assert_eq!(
            rows(view, p).unwrap(),
            vec![vec![s("x"), s("a")], vec![s("x"), s("b")]]
        );
        let bad = json!({"resource": "Patient", "select": [{"unionAll": [
            {"column": [{"name": "a", "path": "id"}]}, {"column": [{"name": "b", "path": "id"}]}]}]});
        assert!(rows(bad, json!({})).unwrap_err().contains("same columns"));
        // Same names, other types: a dateTime under a first branch's date would be cut to
        // its date; a decimal under an integer refused.
        let ansi = |t: &str| json!([{"name": "ansi/type", "value": t}]);
        for (a, b) in [
            (
                json!({"tag": ansi("DATE")}),
                json!({"tag": ansi("TIMESTAMP")}),
            ),
            (json!({"type": "integer"}), json!({"type": "decimal"})),
        ] {
            let column = |extra: &serde_json::Value| {
                let mut c = json!({"name": "d", "path": "id"});
                c.as_object_mut()
                    .unwrap()
                    .extend(extra.as_object().unwrap().clone());
                json!({"column": [c]})
            };
            let bad =
                json!({"resource": "Patient", "select": [{"unionAll": [column(&a), column(&b)]}]});
            let e = rows(bad, json!({})).unwrap_err();
            assert!(e.contains("same column types"), "{e}");
        }
        let same = json!({"resource": "Patient", "select": [{"unionAll": [
            {"column": [{"name": "d", "path": "gender"}]}, {"column": [{"name": "d", "path": "id"}]}]}]});
        assert!(rows(same, json!({"id": "x"})).is_ok());
        // A name a dataset keeps for a current-state table.
        let latest = json!({"resource": "Patient", "name": "patient_latest",
            "select": [{"column": [{"name": "id", "path": "id"}]}]});
        let e = rows(latest, json!({})).unwrap_err();
        assert!(e.contains("current-state table of view \"patient\""), "{e}");
        let dup = json!({"resource": "Patient", "select": [{"column": [{"name": "a", "path": "id"}, {"name": "a", "path": "id"}]}]});
        assert!(rows(dup, json!({})).unwrap_err().contains("twice"));
        assert!(rows(json!({}), json!({})).unwrap_err().contains("resource"));
    }

    #[test]
    fn errors_name_the_select_path() {
        let view = json!({"resource": "Patient", "select": [
            {"column": [{"name": "id", "path": "id"}]},
            {"select": [{"forEach": "name.where(", "column": [{"name": "f", "path": "family"}]}]}]});
        let e = rows(view, json!({})).unwrap_err();
        assert!(e.contains(": select[1].select[0].forEach: "), "{e}");
    }

    #[test]
    fn multiple_values_need_collection() {
        let view = json!({"resource": "Patient", "select": [{"column": [{"name": "f", "path": "name.family"}]}]});
        let p = json!({"name": [{"family": "A"}, {"family": "B"}]});
        let e = rows(view, p.clone()).unwrap_err();
        assert!(e.contains("column `f`") && e.contains("2 values"), "{e}");
        let view = json!({"resource": "Patient", "select": [{"column": [{"name": "f", "path": "name.family", "collection": true}]}]});
        assert_eq!(
            rows(view, p).unwrap(),
            vec![vec![Cell::List(vec![s("A"), s("B")])]]
        );
    }

    /// [`plain_cell`] gives exactly what [`CompiledView::cell`] gives wherever it gives a cell:
    /// over JSON strings, numbers, booleans, objects and arrays, computed items, one or several
    /// values, single-valued and collection columns of several types.
    #[test]
    fn plain_cells_equal_converted_cells() {
        let view = CompiledView::from_json(
            &json!({"resource": "Patient", "select": [{"column": [
                {"name": "s", "path": "a"},
                {"name": "l", "path": "a", "collection": true},
                {"name": "b", "path": "a", "type": "boolean"},
                {"name": "i", "path": "a", "type": "integer"},
                {"name": "t", "path": "a", "type": "dateTime"}
            ]}]})
            .to_string(),
            "test",
        )
        .unwrap();
        let doc = super::super::json::leak_json(
            r#"{"s":"x\ny","e":"","n":1.50,"t":true,"o":{"k":"v"},"a":["p","q"],"d":"2020-01-02"}"#,
        )
        .unwrap();
        let JsonRef::Object(o) = json_ref(doc) else {
            unreachable!()
        };
        let mut items: Vec<Item<'static>> = o
            .iter()
            .map(|(_, value)| Item::Json {
                value,
                fhir_type: None,
            })
            .collect();
        items.push(Item::Json {
            value: o.get("s").unwrap(),
            fhir_type: Some("code"),
        });
        items.extend([
            Item::String(Cow::Borrowed("k1")),
            Item::String(Cow::Owned("k2".into())),
            Item::Integer(7),
            Item::Boolean(false),
            Item::Decimal(Cow::Borrowed("1.0")),
            Item::DateTime(Cow::Borrowed("2020-01-02T03:04:05Z")),
        ]);
        let mut lists: Vec<Vec<Item<'static>>> = vec![Vec::new()];
        lists.extend(items.iter().map(|i| vec![i.clone()]));
        lists.extend(items.windows(2).map(<[_]>::to_vec));
        let mut plain = 0;
        for (c, spec) in view.columns().iter().enumerate() {
            for list in &lists {
                if let Some(cell) = plain_cell(spec, list) {
                    plain += 1;
                    assert!(!cell.owns_memory());
                    assert_eq!(view.cell(c, list), Ok((cell, 0)), "{} {list:?}", spec.name);
                }
            }
        }
        // Null for each single-valued column, and the strings (`s`, `e`, `d`, the typed `s`,
        // `k1`) in the string columns (`t`, a dateTime without an `ansi/type` tag, is one);
        // not the owned string, nor several values.
        assert_eq!(view.columns()[4].column_type, ColumnType::Utf8);
        assert_eq!(plain, 4 + 5 * 2);
        // A collection into a single-valued string column is still an error.
        let many = &lists[lists.len() - 1];
        assert!(plain_cell(&view.columns()[0], many).is_none());
        assert!(view.cell(0, many).is_err());
    }

    /// The same cells through whole views: strings, nulls, arrays into single-valued columns,
    /// choice types, and primitives that carry only an extension (`_name`).
    #[test]
    fn plain_cells_in_views() {
        let view = json!({"resource": "Observation", "select": [{"column": [
            {"name": "status", "path": "status"},
            {"name": "vs", "path": "value.ofType(string)"},
            {"name": "vq", "path": "value.ofType(Quantity).unit"},
            {"name": "issued", "path": "issued"},
            {"name": "subject", "path": "subject.getReferenceKey(Patient)"},
            {"name": "n", "path": "value.ofType(Quantity).value"}
        ]}]});
        assert_eq!(
            rows(
                view.clone(),
                json!({"resourceType": "Observation", "status": "final",
                "valueString": "v", "subject": {"reference": "Patient/p1"},
                "_issued": {"extension": [{"url": "u"}]}})
            )
            .unwrap(),
            vec![vec![
                s("final"),
                s("v"),
                Cell::Null,
                Cell::Null,
                s("p1"),
                Cell::Null
            ]]
        );
        assert_eq!(
            rows(
                view.clone(),
                json!({"resourceType": "Observation", "status": null,
                "_status": {"id": "x"}, "valueQuantity": {"unit": "kg", "value": 2},
                "subject": {"reference": "Group/g"}})
            )
            .unwrap(),
            vec![vec![
                Cell::Null,
                Cell::Null,
                s("kg"),
                Cell::Null,
                Cell::Null,
                s("2")
            ]]
        );
        let e = rows(
            view.clone(),
            json!({"resourceType": "Observation",
            "status": ["a", "b"]}),
        )
        .unwrap_err();
        assert!(
            e.contains("column `status`") && e.contains("2 values"),
            "{e}"
        );
        let e = rows(
            view,
            json!({"resourceType": "Observation",
            "valueQuantity": {"unit": ["a", "b"]}}),
        )
        .unwrap_err();
        assert!(e.contains("column `vq`") && e.contains("2 values"), "{e}");
    }

    #[test]
    fn typed_columns_reject_bad_values() {
        let view = json!({"resource": "Patient", "select": [{"column": [
            {"name": "b", "path": "birthDate", "type": "date", "tag": [{"name": "ansi/type", "value": "DATE"}]}]}]});
        assert_eq!(
            rows(view.clone(), json!({"birthDate": "1970-01-02"})).unwrap(),
            vec![vec![Cell::Date(1)]]
        );
        let e = rows(view, json!({"birthDate": "yesterday"})).unwrap_err();
        assert!(
            e.contains("column `b`") && e.contains("not a FHIR date"),
            "{e}"
        );
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// Arbitrary JSON shaped loosely like a ViewDefinition: keys drawn from the real ones so
        /// the compiler gets past the first checks, values of any shape.
        fn json() -> impl Strategy<Value = serde_json::Value> {
            let keys = prop::sample::select(vec![
                "resource",
                "select",
                "column",
                "name",
                "path",
                "forEach",
                "forEachOrNull",
                "repeat",
                "unionAll",
                "where",
                "constant",
                "collection",
                "type",
                "tag",
                "value",
                "valueString",
                "valueInteger",
            ]);
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                prop::sample::select(vec![
                    "Patient",
                    "id",
                    "name.given",
                    "%c",
                    "@@",
                    "a[",
                    "x",
                    "DATE",
                    ""
                ])
                .prop_map(serde_json::Value::from),
                ".{0,12}".prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(5, 64, 6, move |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                    prop::collection::vec((keys.clone(), inner), 0..6).prop_map(|kv| {
                        serde_json::Value::Object(
                            kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                        )
                    }),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]
            /// Any JSON gives a view or an error naming the file — never a panic; a view that
            /// compiles evaluates any resource without panicking.
            #[test]
            fn arbitrary_views_never_panic(select in json(), other in json(), resource in json()) {
                // Half the time a plausible skeleton, so the select compiler is exercised too.
                let view = if other.is_object() {
                    serde_json::json!({"resource": "Patient", "select": [select]})
                } else {
                    select
                };
                if let Ok(v) = CompiledView::from_json(&view.to_string(), "fuzz.json") {
                    let text = resource.to_string();
                    let doc = crate::view::json::JsonDoc::parse(&text).expect("valid JSON");
                    let mut out = Vec::new();
                    let _ = v.evaluate(doc.root(), &mut out);
                } else if let Err(e) = CompiledView::from_json(&view.to_string(), "fuzz.json") {
                    prop_assert!(e.to_string().contains("fuzz.json"));
                }
            }
        }
    }
}
