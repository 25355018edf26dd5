#!/usr/bin/env python3
"""Checks the default flattening schemas (SQL-on-FHIR v2 ViewDefinitions) in this directory.

Standard library only. Three layers:

1. **Shape** (always): JSON structure, sql-name rule, unique column names, a FHIR `type` and a
   description on every column, allowed `ansi/type` tags (and that they suit the FHIR type),
   `_text` companions after DATE/TIMESTAMP columns, the base-view rule (one per resource type,
   named after it in snake_case, no top-level forEach, no `where`), the parent key
   `<type>_id` first in unnesting views, the fixed column names other tools rely on, and that
   every path parses and uses only the FHIRPath subset the engine implements.
2. **R4 definitions** (with `--r4 DIR`, a `hl7.fhir.r4.core` 4.0.1 package directory holding
   `StructureDefinition-*.json`): every navigated element exists, the declared `type` matches
   the element's type, and no single-valued column can yield more than one value by the
   definitions (a repeating element reached without `first()`, `[n]` or an aggregate).
3. **Data** (when the data directories exist; default `/work/shared/data/synthea-100`):
   runs every view over the ndjson with a small evaluator and reports, per column, whether
   it is ever non-null where the data has the element, single-valued columns that hit more
   than one value (offenders listed), and values that do not fit the column's native type
   (a date that does not parse, a decimal with more than 18 fraction digits, ...).

Exit status: 0 when there are no errors (warnings and notes are fine), 1 otherwise.

    python3 schemas/check_views.py [--schemas DIR] [--data DIR ...] [--no-data] [--r4 DIR] [-v]
"""
import argparse
import decimal
import glob
import json
import os
import re
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = ['/work/shared/data/synthea-100',
                '/work/shared/data/sample-bulk-fhir-datasets-10-partial']

SQL_NAME = re.compile(r'^[A-Za-z][A-Za-z0-9_]*$')
RESERVED_COLUMNS = {'resource', 'resource_type'}  # added by the engine to base / fallback tables

# FHIR primitive types a column may declare.
PRIMITIVES = {'base64Binary', 'boolean', 'canonical', 'code', 'date', 'dateTime', 'decimal', 'id',
              'instant', 'integer', 'integer64', 'markdown', 'oid', 'positiveInt', 'string', 'time',
              'unsignedInt', 'uri', 'url', 'uuid'}
STRING_LIKE = {'string', 'code', 'id', 'uri', 'url', 'canonical', 'oid', 'uuid', 'markdown',
               'base64Binary'}
INTEGER_LIKE = {'integer', 'positiveInt', 'unsignedInt', 'integer64'}

# ansi/type tag values the default views may use, and the FHIR types each suits.
ALLOWED_TAGS = {
    'DATE': {'date'},
    'TIMESTAMP WITH TIME ZONE': {'dateTime', 'instant'},
    'TIMESTAMP': {'dateTime', 'instant'},
    'DECIMAL(38,18)': {'decimal'},
    'DOUBLE': {'decimal'},
    'BIGINT': INTEGER_LIKE,
    'TIME': {'time'},
}
TEMPORAL_TAGS = {'DATE', 'TIMESTAMP WITH TIME ZONE', 'TIMESTAMP', 'TIME'}
NO_COMPANION = {'last_updated'}  # meta.lastUpdated is a full instant: nothing to lose

# Resource types that must have a base view, and the ones the brief lists as smaller extras.
REQUIRED_TYPES = [
    'Patient', 'Encounter', 'Observation', 'Condition', 'Procedure', 'MedicationRequest',
    'Medication', 'MedicationAdministration', 'Immunization', 'AllergyIntolerance',
    'DiagnosticReport', 'DocumentReference', 'CarePlan', 'CareTeam', 'Claim',
    'ExplanationOfBenefit', 'Coverage', 'ImagingStudy', 'Device', 'Organization', 'Practitioner',
    'PractitionerRole', 'Location', 'Group', 'Provenance', 'Goal', 'ServiceRequest',
    'MedicationDispense', 'MedicationStatement', 'QuestionnaireResponse', 'Specimen',
    'RelatedPerson', 'FamilyMemberHistory', 'NutritionOrder', 'Media', 'SupplyDelivery']
REQUIRED_UNNESTING = [
    'observation_component', 'observation_coding', 'condition_coding', 'procedure_coding',
    'medication_request_coding', ('encounter_type', 'encounter_coding'), 'immunization_coding',
    'diagnostic_report_result', 'patient_identifier', 'patient_name', 'patient_address',
    'group_member', 'claim_item', 'explanation_of_benefit_item', 'care_plan_activity',
    ('allergy_intolerance_reaction', 'allergy_intolerance_coding')]
FIXED_COLUMNS = {
    'patient': ['id', 'gender', 'birth_date'],
    'observation': ['id', 'patient_id', 'encounter_id', 'status', 'code_system', 'code',
                    'effective_date_time', 'value_quantity', 'value_unit'],
}
# Resource types whose base view must carry patient_id (they have a subject or patient element).
PATIENT_LINKED = {
    'Encounter', 'Observation', 'Condition', 'Procedure', 'MedicationRequest',
    'MedicationAdministration', 'MedicationDispense', 'MedicationStatement', 'Immunization',
    'AllergyIntolerance', 'DiagnosticReport', 'DocumentReference', 'CarePlan', 'CareTeam',
    'Claim', 'ExplanationOfBenefit', 'Coverage', 'ImagingStudy', 'Device', 'Goal',
    'ServiceRequest', 'QuestionnaireResponse', 'Specimen', 'RelatedPerson',
    'FamilyMemberHistory', 'NutritionOrder', 'Media', 'SupplyDelivery'}

def snake(name):
    return re.sub(r'(?<=[a-z0-9])([A-Z])', r'_\1', name).lower()


# =====================================================================================
# FHIRPath subset: tokenizer and parser
# =====================================================================================

FUNCTIONS = {  # name -> allowed argument counts
    'where': {1}, 'exists': {0, 1}, 'empty': {0}, 'first': {0}, 'last': {0}, 'count': {0},
    'ofType': {1}, 'extension': {1}, 'join': {0, 1}, 'getResourceKey': {0},
    'getReferenceKey': {0, 1}, 'not': {0},
}

TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>'(?:[^'\\]|\\.)*')
  | (?P<num>\d+(?:\.\d+)?)
  | (?P<op><=|>=|!=|[=<>+\-*/(),.\[\]])
  | (?P<ext>%[A-Za-z_][A-Za-z0-9_]*)
  | (?P<this>\$this)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*|`[^`]+`)
""", re.X)


class PathError(Exception):
    pass


def tokenize(src):
    out, pos = [], 0
    while pos < len(src):
        m = TOKEN.match(src, pos)
        if not m:
            raise PathError(f'unexpected character {src[pos]!r} at {pos}')
        pos = m.end()
        kind = m.lastgroup
        if kind == 'ws':
            continue
        text = m.group(kind)
        if kind == 'ident' and text.startswith('`'):
            text = text[1:-1]
        out.append((kind, text))
    out.append(('end', ''))
    return out


class Parser:
    """Recursive descent for: or/and, =/!=, comparisons, + -, * /, postfix navigation."""

    def __init__(self, src):
        self.src = src
        self.toks = tokenize(src)
        self.i = 0

    def peek(self, k=0):
        return self.toks[self.i + k]

    def take(self, text=None):
        tok = self.toks[self.i]
        if text is not None and tok[1] != text:
            raise PathError(f'expected {text!r}, found {tok[1]!r}')
        self.i += 1
        return tok

    def parse(self):
        node = self.expr()
        if self.peek()[0] != 'end':
            raise PathError(f'unexpected {self.peek()[1]!r}')
        return node

    def expr(self):
        return self.binary(0)

    LEVELS = [('or',), ('and',), ('=', '!='), ('<', '>', '<=', '>='), ('+', '-'), ('*', '/')]

    def binary(self, level):
        if level == len(self.LEVELS):
            return self.postfix()
        left = self.binary(level + 1)
        while True:
            kind, text = self.peek()
            if text in self.LEVELS[level] and kind in ('op', 'ident'):
                self.take()
                right = self.binary(level + 1)
                left = ('bin', text, left, right)
            else:
                return left

    def postfix(self):
        node = self.primary()
        while True:
            kind, text = self.peek()
            if text == '.':
                self.take()
                node = self.invocation(node)
            elif text == '[':
                self.take()
                idx = self.expr()
                self.take(']')
                node = ('index', node, idx)
            else:
                return node

    def invocation(self, base):
        kind, name = self.take()
        if kind != 'ident':
            raise PathError(f'expected a name after ".", found {name!r}')
        if self.peek()[1] == '(':
            return ('call', base, name, self.args(name))
        return ('nav', base, name)

    def args(self, name):
        self.take('(')
        args = []
        if self.peek()[1] != ')':
            args.append(self.expr())
            while self.peek()[1] == ',':
                self.take()
                args.append(self.expr())
        self.take(')')
        if name not in FUNCTIONS:
            raise PathError(f'function {name}() is outside the supported subset')
        if len(args) not in FUNCTIONS[name]:
            raise PathError(f'{name}() takes {sorted(FUNCTIONS[name])} arguments, got {len(args)}')
        return args

    def primary(self):
        kind, text = self.peek()
        if kind == 'str':
            self.take()
            return ('lit', bytes(text[1:-1], 'utf-8').decode('unicode_escape'))
        if kind == 'num':
            self.take()
            return ('lit', decimal.Decimal(text) if '.' in text else int(text))
        if kind == 'ext':
            self.take()
            if text != '%rowIndex':
                raise PathError(f'unknown variable {text}')
            return ('rowindex',)
        if kind == 'this':
            self.take()
            return ('this',)
        if text == '(':
            self.take()
            node = self.expr()
            self.take(')')
            return node
        if kind == 'ident':
            self.take()
            if text in ('true', 'false'):
                return ('lit', text == 'true')
            if self.peek()[1] == '(':
                return ('call', ('this',), text, self.args(text))
            return ('nav', ('this',), text)
        raise PathError(f'unexpected {text!r}')


_AST_CACHE = {}


def parse_path(src):
    if src not in _AST_CACHE:
        _AST_CACHE[src] = Parser(src).parse()
    return _AST_CACHE[src]


# =====================================================================================
# Evaluator over JSON (for the data checks)
# =====================================================================================

# Type suffixes that may follow a choice element name in FHIR JSON (valueQuantity, onsetAge, ...).
CHOICE_TYPES = {
    'Base64Binary', 'Boolean', 'Canonical', 'Code', 'Date', 'DateTime', 'Decimal', 'Id',
    'Instant', 'Integer', 'Markdown', 'Oid', 'PositiveInt', 'String', 'Time', 'UnsignedInt',
    'Uri', 'Url', 'Uuid', 'Address', 'Age', 'Annotation', 'Attachment', 'CodeableConcept',
    'Coding', 'ContactPoint', 'Count', 'Distance', 'Duration', 'HumanName', 'Identifier', 'Money',
    'Period', 'Quantity', 'Range', 'Ratio', 'Reference', 'SampledData', 'Signature', 'Timing',
    'ContactDetail', 'Contributor', 'DataRequirement', 'Expression', 'ParameterDefinition',
    'RelatedArtifact', 'TriggerDefinition', 'UsageContext', 'Dosage', 'Meta'}

REF_RE = re.compile(r'(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$')


class Node:
    __slots__ = ('value', 'type')

    def __init__(self, value, type_=None):
        self.value = value
        self.type = type_


class Env:
    """Evaluation context. `refs_any`: getReferenceKey() also returns non-literal references
    (urn:uuid, conditional, contained) as a marker; `no_where`: where() keeps every item. Both
    only serve to explain why a column is null."""

    def __init__(self, resource, row_index=0, refs_any=False, no_where=False):
        self.resource = resource
        self.row_index = row_index
        self.refs_any = refs_any
        self.no_where = no_where


def _children(value, name):
    """Navigate one name on a JSON object: (values, choice type or None)."""
    if not isinstance(value, dict):
        return [], None
    if name in value:
        v = value[name]
        return (v if isinstance(v, list) else [v]), None
    for key, v in value.items():
        if key.startswith(name) and key[len(name):] in CHOICE_TYPES:
            return (v if isinstance(v, list) else [v]), key[len(name):]
    return [], None


def _type_matches(node, t):
    if node.type is not None:
        return node.type.lower() == t.lower()
    v = node.value
    if t == 'boolean':
        return isinstance(v, bool)
    if t in INTEGER_LIKE:
        return isinstance(v, int) and not isinstance(v, bool)
    if t == 'decimal':
        return isinstance(v, (int, decimal.Decimal)) and not isinstance(v, bool)
    if t in PRIMITIVES:
        return isinstance(v, str)
    return isinstance(v, dict)


def _singleton(coll, what):
    if len(coll) > 1:
        raise EvalError(f'{what} needs a single item, got {len(coll)}')
    return coll[0].value if coll else None


class EvalError(Exception):
    pass


def evaluate(ast, focus, env):
    """Evaluate `ast` with the input collection `focus` (list of Node)."""
    op = ast[0]
    if op == 'this':
        return focus
    if op == 'lit':
        return [Node(ast[1])]
    if op == 'rowindex':
        return [Node(env.row_index)]
    if op == 'nav':
        base = evaluate(ast[1], focus, env)
        out = []
        for n in base:
            vals, ctype = _children(n.value, ast[2])
            out.extend(Node(v, ctype) for v in vals)
        return out
    if op == 'index':
        base = evaluate(ast[1], focus, env)
        idx = _singleton(evaluate(ast[2], focus, env), 'index')
        return [base[idx]] if isinstance(idx, int) and 0 <= idx < len(base) else []
    if op == 'call':
        return _call(ast, focus, env)
    if op == 'bin':
        return _binary(ast, focus, env)
    raise EvalError(f'cannot evaluate {op}')


def _call(ast, focus, env):
    _, base_ast, name, args = ast
    base = evaluate(base_ast, focus, env)
    if name == 'where':
        if env.no_where:
            return base
        out = []
        for n in base:
            r = evaluate(args[0], [n], env)
            if len(r) == 1 and r[0].value is True:
                out.append(n)
        return out
    if name == 'exists':
        if args:
            base = [n for n in base if [x.value for x in evaluate(args[0], [n], env)] == [True]]
        return [Node(bool(base))]
    if name == 'empty':
        return [Node(not base)]
    if name == 'not':
        v = _singleton(base, 'not()')
        return [] if v is None else [Node(not v)]
    if name == 'first':
        return base[:1]
    if name == 'last':
        return base[-1:]
    if name == 'count':
        return [Node(len(base))]
    if name == 'ofType':
        t = args[0][2] if args[0][0] == 'nav' else None
        if t is None:
            raise EvalError('ofType() needs a type name')
        return [n for n in base if _type_matches(n, t)]
    if name == 'extension':
        url = _singleton(evaluate(args[0], focus, env), 'extension url')
        out = []
        for n in base:
            for e in (n.value.get('extension', []) if isinstance(n.value, dict) else []):
                if isinstance(e, dict) and e.get('url') == url:
                    out.append(Node(e, 'Extension'))
        return out
    if name == 'join':
        sep = _singleton(evaluate(args[0], focus, env), 'join separator') if args else ''
        if not base:
            return []
        return [Node(sep.join(str(n.value) for n in base))]
    if name == 'getResourceKey':
        rid = env.resource.get('id')
        return [Node(rid)] if rid is not None else []
    if name == 'getReferenceKey':
        want = None
        if args:
            if args[0][0] != 'nav':
                raise EvalError('getReferenceKey() takes a type name')
            want = args[0][2]
        out = []
        for n in base:
            ref = n.value.get('reference') if isinstance(n.value, dict) else None
            if not isinstance(ref, str):
                continue
            m = REF_RE.search(ref) if '?' not in ref and not ref.startswith('#') else None
            if m and (want is None or m.group(1) == want):
                out.append(Node(m.group(2)))
            elif env.refs_any and m is None:
                out.append(Node(ref, 'NonLiteralReference'))
        return out
    raise EvalError(f'unsupported function {name}')


def _binary(ast, focus, env):
    _, op, la, ra = ast
    left = evaluate(la, focus, env)
    right = evaluate(ra, focus, env)
    if op in ('and', 'or'):
        lv = _singleton(left, op)
        rv = _singleton(right, op)
        if op == 'and':
            if lv is False or rv is False:
                return [Node(False)]
            return [Node(True)] if lv is True and rv is True else []
        if lv is True or rv is True:
            return [Node(True)]
        return [Node(False)] if lv is False and rv is False else []
    if not left or not right:
        return []
    if op in ('=', '!='):
        eq = [n.value for n in left] == [n.value for n in right]
        return [Node(eq if op == '=' else not eq)]
    lv = _singleton(left, op)
    rv = _singleton(right, op)
    try:
        if op == '<':
            return [Node(lv < rv)]
        if op == '>':
            return [Node(lv > rv)]
        if op == '<=':
            return [Node(lv <= rv)]
        if op == '>=':
            return [Node(lv >= rv)]
        if op == '+':
            return [Node(lv + rv)]
        if op == '-':
            return [Node(lv - rv)]
        if op == '*':
            return [Node(lv * rv)]
        if op == '/':
            return [Node(decimal.Decimal(lv) / decimal.Decimal(rv))] if rv else []
    except TypeError as e:
        raise EvalError(str(e))
    raise EvalError(f'unsupported operator {op}')


# =====================================================================================
# View processing (the spec's Process algorithm) for the data checks
# =====================================================================================

class ColumnStats:
    __slots__ = ('rows', 'nonnull', 'nonliteral', 'filtered', 'multi', 'misfit', 'errors')

    def __init__(self):
        self.rows = 0
        self.nonnull = 0
        self.nonliteral = 0  # null because the reference is urn:uuid / conditional / contained
        self.filtered = 0    # null because a where() filter matched nothing, element present
        self.multi = []    # resource ids where a single-valued column got several values
        self.misfit = []   # (resource id, value, reason)
        self.errors = []   # (resource id, message)


def all_columns(select):
    """Columns of a select tree in output order (columns, nested selects, unionAll)."""
    out = list(select.get('column', []))
    for s in select.get('select', []):
        out += all_columns(s)
    if select.get('unionAll'):
        out += all_columns(select['unionAll'][0])
    return out


def view_columns(view):
    out = []
    for s in view.get('select', []):
        out += all_columns(s)
    return out


def process(select, node, env, stats, rid):
    """Rows (list of dicts) of one selection structure applied to a Node."""
    if select.get('forEach') or select.get('forEachOrNull'):
        path = select.get('forEach') or select.get('forEachOrNull')
        foci = evaluate(parse_path(path), [node], env)
    elif select.get('repeat'):
        foci, frontier = [], [node]
        while frontier:
            nxt = []
            for f in frontier:
                for p in select['repeat']:
                    nxt += evaluate(parse_path(p), [f], env)
            foci += nxt
            frontier = nxt
    else:
        foci = [node]
    rows = []
    for i, focus in enumerate(foci):
        ienv = Env(env.resource, i if (select.get('forEach') or select.get('forEachOrNull') or
                                      select.get('repeat')) else env.row_index)
        parts = []
        row = {}
        for c in select.get('column', []):
            row[c['name']] = column_value(c, focus, ienv, stats, rid)
        parts.append([row])
        for s in select.get('select', []):
            parts.append(process(s, focus, ienv, stats, rid))
        if select.get('unionAll'):
            u = []
            for s in select['unionAll']:
                u += process(s, focus, ienv, stats, rid)
            parts.append(u)
        combined = [{}]
        for p in parts:
            combined = [dict(a, **b) for a in combined for b in p]
        rows += combined
    if not foci and select.get('forEachOrNull'):
        rows.append({c['name']: (0 if c['path'] == '%rowIndex' else None)
                     for c in all_columns(select)})
    return rows


def column_value(c, focus, env, stats, rid):
    st = stats[c['name']]
    st.rows += 1
    try:
        ast = parse_path(c['path'])
    except PathError as e:
        st.errors.append((rid, str(e)))
        return None
    try:
        res = evaluate(ast, [focus], env)
    except EvalError as e:
        st.errors.append((rid, str(e)))
        return None
    if not res:
        try:
            if evaluate(ast, [focus], Env(env.resource, env.row_index, refs_any=True)):
                st.nonliteral += 1
            elif evaluate(ast, [focus], Env(env.resource, env.row_index, no_where=True)):
                st.filtered += 1
        except EvalError:
            pass
        return None
    if len(res) > 1 and not c.get('collection'):
        st.multi.append(rid)
        return None
    st.nonnull += 1
    for n in res:
        why = misfit(c, n.value)
        if why:
            st.misfit.append((rid, n.value, why))
    return [n.value for n in res] if c.get('collection') else res[0].value


DATE_RE = re.compile(r'^\d{4}(-(0[1-9]|1[0-2])(-(0[1-9]|[12]\d|3[01]))?)?$')
DATETIME_RE = re.compile(r'^\d{4}(-(0[1-9]|1[0-2])(-(0[1-9]|[12]\d|3[01])'
                         r'(T([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d{1,9})?'
                         r'(Z|[+-]((0\d|1[0-3]):[0-5]\d|14:00)))?)?)?$')
INSTANT_RE = re.compile(r'^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])T([01]\d|2[0-3]):[0-5]\d:'
                        r'([0-5]\d|60)(\.\d{1,9})?(Z|[+-]((0\d|1[0-3]):[0-5]\d|14:00))$')


def tag_of(c):
    for t in c.get('tag', []) or []:
        if t.get('name') == 'ansi/type':
            return t.get('value')
    return None


def misfit(c, v):
    """Why value v does not fit column c (FHIR type and native tag), or None."""
    t = c.get('type')
    tag = tag_of(c)
    if t == 'boolean':
        return None if isinstance(v, bool) else f'not a boolean: {type(v).__name__}'
    if t in INTEGER_LIKE:
        if isinstance(v, bool) or not isinstance(v, int):
            return f'not an integer: {type(v).__name__}'
        if t == 'positiveInt' and v < 1 or t == 'unsignedInt' and v < 0:
            return f'out of range for {t}'
        if tag is None and not -2**31 <= v < 2**31:
            return 'does not fit Int32'
        return None
    if t == 'decimal':
        if isinstance(v, bool) or not isinstance(v, (int, decimal.Decimal)):
            return f'not a number: {type(v).__name__}'
        m = re.match(r'^DECIMAL\((\d+),(\d+)\)$', tag or '')
        if m:
            p, s = int(m.group(1)), int(m.group(2))
            d = decimal.Decimal(v)
            exp = d.as_tuple().exponent
            frac = -exp if exp < 0 else 0
            digits = len(d.as_tuple().digits)
            int_digits = max(digits - frac, 0) if exp <= 0 else digits + exp
            if frac > s:
                return f'{frac} fraction digits > scale {s}'
            if int_digits > p - s:
                return f'{int_digits} integer digits > {p - s}'
        return None
    if t in PRIMITIVES:
        if not isinstance(v, str):
            return f'not a string: {type(v).__name__}'
        if t == 'date' and not DATE_RE.match(v):
            return 'not a FHIR date'
        if t == 'dateTime' and not DATETIME_RE.match(v):
            return 'not a FHIR dateTime'
        if t == 'instant' and not INSTANT_RE.match(v):
            return 'not a FHIR instant'
        if tag == 'DATE' and t != 'date':
            return 'DATE tag on a non-date'
        return None
    return None


def read_ndjson(data_dirs):
    """resource type -> list of (file, resource) across the data directories."""
    by_type = defaultdict(list)
    for d in data_dirs:
        for f in sorted(glob.glob(os.path.join(d, '*.ndjson'))):
            with open(f, encoding='utf-8') as fh:
                for line in fh:
                    line = line.strip()
                    if not line:
                        continue
                    r = json.loads(line, parse_float=decimal.Decimal)
                    if isinstance(r, dict) and 'resourceType' in r:
                        by_type[r['resourceType']].append(r)
    return by_type


def run_view(view, resources):
    stats = defaultdict(ColumnStats)
    nrows = 0
    for r in resources:
        env = Env(r)
        root = Node(r, r['resourceType'])
        rows = [{}]
        try:
            for s in view['select']:
                part = process(s, root, env, stats, r.get('id'))
                rows = [dict(a, **b) for a in rows for b in part]
        except EvalError as e:
            stats['<view>'].errors.append((r.get('id'), str(e)))
            continue
        nrows += len(rows)
    return nrows, stats


# =====================================================================================
# Static checks against the R4 StructureDefinitions (optional)
# =====================================================================================

class R4:
    def __init__(self, package_dir):
        self.els = {}
        for f in glob.glob(os.path.join(package_dir, 'StructureDefinition-*.json')):
            with open(f, encoding='utf-8') as fh:
                sd = json.load(fh)
            if sd.get('derivation') != 'specialization' or 'snapshot' not in sd:
                continue
            t = sd['type']
            for e in sd['snapshot']['element']:
                p = e['path']
                if p == t:
                    continue
                types = [self._code(x) for x in e.get('type', [])]
                cref = e.get('contentReference')
                self.els[p] = (types, e.get('max'), cref)
        if not self.els:
            raise SystemExit(f'no StructureDefinitions under {package_dir}')

    @staticmethod
    def _code(t):
        code = t['code']
        if code.startswith('http://hl7.org/fhirpath/System.'):
            for x in t.get('extension', []):
                if x.get('url', '').endswith('structuredefinition-fhir-type'):
                    return x.get('valueUrl') or x.get('valueUri') or code
            return code.rsplit('.', 1)[-1].lower()
        return code

    def child(self, owner, name):
        """owner: a type name or a backbone path. Returns (element path, types, max) or None."""
        for cand in (f'{owner}.{name}', f'{owner}.{name}[x]'):
            if cand in self.els:
                types, mx, cref = self.els[cand]
                if cref:
                    types = [cref.lstrip('#').split('#')[-1]]
                elif types in (['BackboneElement'], ['Element']):
                    types = [cand]
                return cand, types, mx
        # inherited from DomainResource / Resource / Element
        for base in ('DomainResource', 'Resource', 'Element', 'BackboneElement'):
            cand = f'{base}.{name}'
            if cand in self.els:
                types, mx, cref = self.els[cand]
                return cand, types, mx
        return None


def infer(r4, ast, types, many, problems):
    """Static type of `ast` given input (candidate types, is-collection). Returns (types, many)."""
    op = ast[0]
    if op == 'this':
        return types, many
    if op == 'lit':
        v = ast[1]
        t = 'boolean' if isinstance(v, bool) else 'integer' if isinstance(v, int) else \
            'decimal' if isinstance(v, decimal.Decimal) else 'string'
        return [t], False
    if op == 'rowindex':
        return ['integer'], False
    if op == 'nav':
        btypes, bmany = infer(r4, ast[1], types, many, problems)
        out, omany = [], bmany
        for bt in btypes:
            c = r4.child(bt, ast[2])
            if c is None:
                continue
            _, ctypes, mx = c
            out += ctypes
            if mx != '1' and mx != '0':
                omany = True
        if not out:
            problems.append(f'no element {ast[2]!r} on {"/".join(btypes) or "?"}')
            return [], omany
        return sorted(set(out)), omany
    if op == 'index':
        bt, _ = infer(r4, ast[1], types, many, problems)
        return bt, False
    if op == 'bin':
        infer(r4, ast[2], types, many, problems)
        infer(r4, ast[3], types, many, problems)
        if ast[1] in ('+', '-', '*', '/'):
            return ['decimal'], False
        return ['boolean'], False
    if op == 'call':
        _, base_ast, name, args = ast
        bt, bmany = infer(r4, base_ast, types, many, problems)
        if name == 'where':
            for t in bt:
                infer(r4, args[0], [t], False, problems)
            return bt, bmany
        if name in ('exists', 'empty', 'not'):
            return ['boolean'], False
        if name in ('first', 'last'):
            return bt, False
        if name == 'count':
            return ['integer'], False
        if name == 'join':
            return ['string'], False
        if name == 'ofType':
            want = args[0][2]
            if bt and want not in bt:
                problems.append(f'ofType({want}) but the element is {"/".join(bt)}')
            return [want], bmany
        if name == 'extension':
            return ['Extension'], True
        if name == 'getResourceKey':
            return ['id'], False
        if name == 'getReferenceKey':
            if bt and 'Reference' not in bt:
                problems.append(f'getReferenceKey() on {"/".join(bt)}')
            if args and args[0][0] == 'nav' and not r4.child(args[0][2], 'id'):
                problems.append(f'getReferenceKey({args[0][2]}): unknown resource type')
            return ['id'], bmany
    return [], many


COMPATIBLE = {  # declared type -> inferred types accepted for it
    'string': {'string', 'markdown'},
    'code': {'code'},
    'uri': {'uri'},
    'url': {'url', 'uri'},
    'canonical': {'canonical'},
    'id': {'id', 'string'},
    'dateTime': {'dateTime'},
    'instant': {'instant'},
}


def static_check(r4, view):
    problems = []
    root = view['resource']

    def walk(select, ctx_types, where):
        if select.get('forEach') or select.get('forEachOrNull'):
            p = select.get('forEach') or select.get('forEachOrNull')
            errs = []
            ctx_types, _ = infer(r4, parse_path(p), ctx_types, False, errs)
            problems.extend(f'{where} forEach {p!r}: {e}' for e in errs)
        for c in select.get('column', []):
            errs = []
            try:
                ast = parse_path(c['path'])
            except (PathError, KeyError, TypeError):
                continue  # reported by the shape check
            t, many = infer(r4, ast, ctx_types, False, errs)
            problems.extend(f'column {c["name"]}: {e}' for e in errs)
            if many and not c.get('collection'):
                problems.append(f'column {c["name"]}: {c["path"]!r} may yield several values '
                                f'by the R4 definitions (add first() or collection: true)')
            decl = c.get('type')
            if t and decl:
                ok = set(COMPATIBLE.get(decl, {decl}))
                if not ok & set(t):
                    problems.append(f'column {c["name"]}: declared {decl}, element is {"/".join(t)}')
        for s in select.get('select', []):
            walk(s, ctx_types, where)
        for s in select.get('unionAll', []):
            walk(s, ctx_types, where)

    for s in view['select']:
        walk(s, [root], view['name'])
    return problems


# =====================================================================================
# Shape checks
# =====================================================================================

def load_views(schema_dir):
    views = []
    for f in sorted(glob.glob(os.path.join(schema_dir, '*.json'))):
        with open(f, encoding='utf-8') as fh:
            views.append((os.path.basename(f), json.load(fh)))
    return views


def shape_check(fname, v):
    errs = []
    e = errs.append
    if v.get('resourceType') != 'ViewDefinition':
        e('resourceType must be "ViewDefinition"')
    name = v.get('name')
    if not isinstance(name, str) or not SQL_NAME.match(name):
        e(f'name {name!r} breaks the sql-name rule')
    elif fname != name + '.json':
        e(f'file name should be {name}.json')
    if v.get('status') not in ('draft', 'active', 'retired', 'unknown'):
        e('status missing or invalid')
    if not isinstance(v.get('resource'), str):
        e('resource missing')
    if not v.get('description'):
        e('view description missing')
    if v.get('where'):
        e('default views must not filter with where')
    if 'constant' in v:
        e('default views use no constants')
    sel = v.get('select')
    if not isinstance(sel, list) or not sel:
        e('select must be a non-empty list')
        return errs
    seen = set()

    def walk(select, where):
        allowed = {'column', 'select', 'forEach', 'forEachOrNull', 'repeat', 'unionAll'}
        for k in select:
            if k not in allowed:
                e(f'{where}: unknown key {k!r}')
        if sum(bool(select.get(k)) for k in ('forEach', 'forEachOrNull', 'repeat')) > 1:
            e(f'{where}: more than one of forEach, forEachOrNull, repeat')
        for k in ('forEach', 'forEachOrNull'):
            if select.get(k):
                try:
                    parse_path(select[k])
                except PathError as ex:
                    e(f'{where}: {k} {select[k]!r}: {ex}')
        for c in select.get('column', []):
            cn = c.get('name')
            if not isinstance(cn, str) or not SQL_NAME.match(cn):
                e(f'column name {cn!r} breaks the sql-name rule')
                continue
            if cn in seen:
                e(f'column {cn} defined twice')
            seen.add(cn)
            for k in c:
                if k not in ('name', 'path', 'type', 'description', 'collection', 'tag'):
                    e(f'column {cn}: unknown key {k!r}')
            if not isinstance(c.get('path'), str):
                e(f'column {cn}: path missing')
            else:
                try:
                    parse_path(c['path'])
                except PathError as ex:
                    e(f'column {cn}: path {c["path"]!r}: {ex}')
            t = c.get('type')
            if not t:
                e(f'column {cn}: no type')
            elif t not in PRIMITIVES:
                e(f'column {cn}: type {t!r} is not a FHIR primitive')
            if not c.get('description'):
                e(f'column {cn}: no description')
            if 'collection' in c and not isinstance(c['collection'], bool):
                e(f'column {cn}: collection must be a boolean')
            for tg in c.get('tag', []) or []:
                if tg.get('name') != 'ansi/type':
                    e(f'column {cn}: unknown tag {tg.get("name")!r}')
                elif tg.get('value') not in ALLOWED_TAGS:
                    e(f'column {cn}: ansi/type {tg.get("value")!r} not in the allowed list')
                elif t not in ALLOWED_TAGS[tg['value']]:
                    e(f'column {cn}: ansi/type {tg["value"]} does not suit FHIR type {t}')
            if t in ('date', 'dateTime', 'instant', 'decimal', 'time') and not tag_of(c) \
                    and not cn.endswith('_text'):
                e(f'column {cn}: {t} column without an ansi/type tag (default views use native types)')
        for s in select.get('select', []):
            walk(s, where + '.select')
        for s in select.get('unionAll', []):
            walk(s, where + '.unionAll')

    for i, s in enumerate(sel):
        walk(s, f'select[{i}]')
        if isinstance(name, str) and name == snake(v.get('resource', '')) and \
                (s.get('forEach') or s.get('forEachOrNull') or s.get('repeat')):
            e(f'base view: top-level select[{i}] must not iterate')

    cols = view_columns(v)
    names = [c.get('name') for c in cols]
    for i, c in enumerate(cols):
        tg = tag_of(c)
        if tg in TEMPORAL_TAGS and c['name'] not in NO_COMPANION:
            nxt = cols[i + 1] if i + 1 < len(cols) else None
            if not nxt or nxt.get('name') != c['name'] + '_text' or nxt.get('path') != c['path'] \
                    or nxt.get('type') != c.get('type') or tag_of(nxt):
                e(f'column {c["name"]}: needs an untagged companion {c["name"]}_text right after it '
                  f'(same path and type)')
    rtype = v.get('resource', '')
    base = snake(rtype)
    if name == base:
        if not names or names[0] != 'id' or cols[0].get('path') != 'getResourceKey()':
            e('base view: first column must be id = getResourceKey()')
        if rtype in PATIENT_LINKED and 'patient_id' not in names:
            e('base view: patient_id missing')
        if 'last_updated' not in names:
            e('base view: last_updated missing')
        for n in set(names) & RESERVED_COLUMNS:
            e(f'column {n}: reserved for the engine (raw JSON / fallback table)')
    elif isinstance(name, str):
        if not name.startswith(base + '_'):
            e(f'unnesting view must be named {base}_<element>')
        if not names or names[0] != base + '_id' or cols[0].get('path') != 'getResourceKey()':
            e(f'unnesting view: first column must be {base}_id = getResourceKey()')
        if rtype in PATIENT_LINKED and 'patient_id' not in names:
            e('unnesting view: patient_id missing')
    for req in FIXED_COLUMNS.get(name, []):
        if req not in names:
            e(f'fixed column {req} missing')
    return errs


# =====================================================================================
# main
# =====================================================================================

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--schemas', default=HERE, help='directory of ViewDefinition JSON files')
    ap.add_argument('--data', action='append', help='ndjson directory (repeatable); default '
                    + ', '.join(DEFAULT_DATA))
    ap.add_argument('--no-data', action='store_true', help='skip the data checks')
    ap.add_argument('--r4', help='hl7.fhir.r4.core package dir (StructureDefinition-*.json)')
    ap.add_argument('-v', '--verbose', action='store_true', help='print per-column statistics')
    args = ap.parse_args(argv)

    views = load_views(args.schemas)
    n_err = n_warn = 0

    def err(msg):
        nonlocal n_err
        n_err += 1
        print('ERROR  ' + msg)

    def warn(msg):
        nonlocal n_warn
        n_warn += 1
        print('WARN   ' + msg)

    print(f'== shape: {len(views)} views in {args.schemas}')
    by_name = {}
    for fname, v in views:
        for m in shape_check(fname, v):
            err(f'{fname}: {m}')
        by_name[v.get('name')] = v
    bases = {snake(v.get('resource', '')): v for v in by_name.values()
             if v.get('name') == snake(v.get('resource', ''))}
    for t in REQUIRED_TYPES:
        if snake(t) not in bases:
            err(f'no base view for {t} (expected {snake(t)}.json)')
    for req in REQUIRED_UNNESTING:
        alts = req if isinstance(req, tuple) else (req,)
        if not any(a in by_name for a in alts):
            err(f'missing unnesting view {" or ".join(alts)}')

    if args.r4:
        print(f'== R4 definitions: {args.r4}')
        r4 = R4(args.r4)
        for _, v in views:
            for p in static_check(r4, v):
                err(f'{v["name"]}: {p}')

    data_dirs = args.data or DEFAULT_DATA
    if args.no_data:
        print('== data: skipped (--no-data)')
    elif not os.path.isdir('/work/shared/data') and not args.data:
        print('== data: skipped (/work/shared/data does not exist)')
    elif not [d for d in data_dirs if os.path.isdir(d)]:
        print(f'== data: skipped (none of {", ".join(data_dirs)} exists)')
    else:
        data_dirs = [d for d in data_dirs if os.path.isdir(d)]
        never = {}  # view -> columns never filled in any data directory
        for d in data_dirs:
            print(f'== data: {d}')
            by_type = read_ndjson([d])
            for _, v in views:
                res = by_type.get(v['resource'], [])
                cols = view_columns(v)
                if not res:
                    never.setdefault(v['name'], [c['name'] for c in cols])
                    if args.verbose:
                        print(f'       {v["name"]}: no {v["resource"]} resources')
                    continue
                nrows, stats = run_view(v, res)
                filled = set()
                for c in cols:
                    st = stats.get(c['name'], ColumnStats())
                    where = f'{v["name"]}.{c["name"]}'
                    if st.errors:
                        err(f'{where}: evaluation error in {len(st.errors)} rows, '
                            f'e.g. {st.errors[0]}')
                    if st.multi:
                        err(f'{where}: several values in a single-valued column for '
                            f'{len(st.multi)} resources, e.g. {st.multi[:3]}')
                    if st.misfit:
                        err(f'{where}: {len(st.misfit)} values do not fit '
                            f'{c["type"]}/{tag_of(c) or "default"}, e.g. {st.misfit[:2]}')
                    if st.nonliteral:
                        print(f'NOTE   {where}: null in {st.nonliteral} of {st.rows} rows because '
                              f'the reference is not a literal Type/id (urn:uuid, conditional or '
                              f'contained)')
                    if st.filtered and not st.nonnull:
                        print(f'NOTE   {where}: always null; the element is present but the '
                              f'where() filter never matches ({st.filtered} rows)')
                    if st.nonnull:
                        filled.add(c['name'])
                    if args.verbose:
                        print(f'       {where}: {st.nonnull}/{st.rows} non-null')
                absent = [c['name'] for c in cols if c['name'] not in filled]
                prev = never.get(v['name'])
                never[v['name']] = [n for n in (prev if prev is not None else absent)
                                    if n not in filled]
                print(f'ok     {v["name"]}: {len(res)} resources -> {nrows} rows; '
                      f'{len(filled)}/{len(cols)} columns non-null')
                if stats.get('<view>') and stats['<view>'].errors:
                    err(f'{v["name"]}: {len(stats["<view>"].errors)} resources failed, '
                        f'e.g. {stats["<view>"].errors[0]}')
        print('== columns null in every data directory (the data lacks the element):')
        for name in sorted(never):
            if never[name]:
                total = len(view_columns(by_name[name]))
                print(f'       {name} ({len(never[name])}/{total}): {", ".join(never[name])}')
    print(f'== {n_err} errors, {n_warn} warnings')
    return 1 if n_err else 0


if __name__ == '__main__':
    sys.exit(main())
