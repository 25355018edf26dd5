//! Arrow builders for one view: cells appended column by column, finished into a RecordBatch.

use std::sync::Arc;

use datafusion::arrow::{
    array::{
        Array, ArrayBuilder, ArrayRef, BooleanBuilder, Date32Builder, Decimal128Builder,
        Float64Builder, Int32Builder, Int64Builder, ListBuilder, StringArray, StringBuilder,
        Time64MicrosecondBuilder, TimestampMicrosecondBuilder, make_builder,
    },
    record_batch::RecordBatch,
};

use crate::view::{Cell, ColumnType, CompiledView};

/// Builders for one view's columns (plus the raw `resource` column when the view has one).
pub(crate) struct ViewBuilders {
    pub view: Arc<CompiledView>,
    columns: Vec<Column>,
    raw: Option<StringBuilder>,
    pub rows: usize,
}

/// One column's builder, resolved to its concrete type once, so appending a cell is a `match`
/// rather than a dynamic downcast per cell.
enum Column {
    Utf8(StringBuilder),
    Boolean(BooleanBuilder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    Float64(Float64Builder),
    Decimal(Decimal128Builder),
    Date32(Date32Builder),
    Timestamp(TimestampMicrosecondBuilder),
    Time64(Time64MicrosecondBuilder),
    /// A `collection: true` column (its item type).
    List(ColumnType, ListBuilder<Box<dyn ArrayBuilder>>),
}

fn unbox<T: 'static>(b: Box<dyn ArrayBuilder>) -> Box<T> {
    b.into_box_any()
        .downcast::<T>()
        .unwrap_or_else(|_| unreachable!("make_builder returns the builder of the data type"))
}

/// `make_builder` configures the builder for the exact data type (decimal precision, time zone);
/// unbox it as the concrete builder of `ty`.
fn concrete(ty: ColumnType, b: Box<dyn ArrayBuilder>) -> Column {
    match ty {
        ColumnType::Utf8 => Column::Utf8(*unbox(b)),
        ColumnType::Boolean => Column::Boolean(*unbox(b)),
        ColumnType::Int32 => Column::Int32(*unbox(b)),
        ColumnType::Int64 => Column::Int64(*unbox(b)),
        ColumnType::Float64 => Column::Float64(*unbox(b)),
        ColumnType::Decimal(..) => Column::Decimal(*unbox(b)),
        ColumnType::Date32 => Column::Date32(*unbox(b)),
        ColumnType::Timestamp(_) => Column::Timestamp(*unbox(b)),
        ColumnType::Time64 => Column::Time64(*unbox(b)),
    }
}

/// Most bytes a raw `resource` column is first sized for (a larger batch-bytes setting grows
/// it by doubling, as before).
const MAX_PRESIZED_RAW_BYTES: usize = 64 << 20;

impl ViewBuilders {
    /// Builders with room for `capacity` rows; the raw `resource` column (only when the view
    /// has one) also gets room for `raw_bytes` of JSON plus an eighth, as
    /// [`finish_presized`] gives later batches: starting it small, it would grow by doubling,
    /// each growth a copy of megabytes. Capacity never touched costs no memory.
    pub fn new(view: Arc<CompiledView>, capacity: usize, raw_bytes: usize) -> Self {
        let columns = view
            .columns()
            .iter()
            .zip(view.schema().fields())
            .map(|(c, f)| {
                let b = make_builder(f.data_type(), capacity);
                if c.collection {
                    Column::List(c.column_type, *unbox(b))
                } else {
                    concrete(c.column_type, b)
                }
            })
            .collect();
        let raw = view.raw_column().then(|| {
            let bytes = raw_bytes
                .min(MAX_PRESIZED_RAW_BYTES)
                .max(capacity.saturating_mul(512));
            StringBuilder::with_capacity(capacity, bytes.saturating_add(bytes / 8))
        });
        ViewBuilders {
            view,
            columns,
            raw,
            rows: 0,
        }
    }

    /// Append one row; `raw` is the resource's JSON text.
    pub fn append<'c, 'a: 'c>(&mut self, row: impl IntoIterator<Item = &'c Cell<'a>>, raw: &str) {
        for (col, cell) in self.columns.iter_mut().zip(row) {
            // Cells were produced by `types::convert` for this very column type, so the variant
            // always matches; a mismatch is appended as null rather than panicking.
            match col {
                Column::Utf8(b) => match cell {
                    Cell::Str(s) => b.append_value(s),
                    _ => b.append_null(),
                },
                Column::Boolean(b) => b.append_option(match cell {
                    Cell::Bool(v) => Some(*v),
                    _ => None,
                }),
                Column::Int32(b) => b.append_option(match cell {
                    Cell::Int(v) => i32::try_from(*v).ok(),
                    _ => None,
                }),
                Column::Int64(b) => b.append_option(match cell {
                    Cell::Int(v) => Some(*v),
                    _ => None,
                }),
                Column::Float64(b) => b.append_option(match cell {
                    Cell::Float(v) => Some(*v),
                    _ => None,
                }),
                Column::Decimal(b) => b.append_option(match cell {
                    Cell::Decimal(v) => Some(*v),
                    _ => None,
                }),
                Column::Date32(b) => b.append_option(match cell {
                    Cell::Date(v) => Some(*v),
                    _ => None,
                }),
                Column::Timestamp(b) => b.append_option(match cell {
                    Cell::Timestamp(v) => Some(*v),
                    _ => None,
                }),
                Column::Time64(b) => b.append_option(match cell {
                    Cell::Time(v) => Some(*v),
                    _ => None,
                }),
                Column::List(ty, list) => {
                    match cell {
                        Cell::List(items) => {
                            for i in items {
                                append(list.values().as_mut(), *ty, i);
                            }
                        }
                        Cell::Null => {} // an empty collection is [], not null
                        other => append(list.values().as_mut(), *ty, other),
                    }
                    list.append(true);
                }
            }
        }
        if let Some(r) = &mut self.raw {
            r.append_value(raw);
        }
        self.rows += 1;
    }

    /// Bytes in the raw `resource` column so far (0 without one).
    pub fn raw_bytes(&self) -> usize {
        self.raw.as_ref().map_or(0, |r| r.values_slice().len())
    }

    /// Finish the rows so far into a batch (builders are reset).
    pub fn finish(&mut self) -> Result<RecordBatch, String> {
        let mut arrays: Vec<ArrayRef> = self
            .columns
            .iter_mut()
            .map(|c| -> ArrayRef {
                match c {
                    Column::Utf8(b) => Arc::new(finish_presized(b)),
                    Column::Boolean(b) => Arc::new(b.finish()),
                    Column::Int32(b) => Arc::new(b.finish()),
                    Column::Int64(b) => Arc::new(b.finish()),
                    Column::Float64(b) => Arc::new(b.finish()),
                    Column::Decimal(b) => Arc::new(b.finish()),
                    Column::Date32(b) => Arc::new(b.finish()),
                    Column::Timestamp(b) => Arc::new(b.finish()),
                    Column::Time64(b) => Arc::new(b.finish()),
                    Column::List(_, b) => Arc::new(b.finish()),
                }
            })
            .collect();
        if let Some(r) = &mut self.raw {
            arrays.push(Arc::new(finish_presized(r)));
        }
        self.rows = 0;
        RecordBatch::try_new(self.view.schema().clone(), arrays).map_err(|e| e.to_string())
    }
}

/// Finish a string builder and start the next batch with room for what this one held (plus an
/// eighth): a builder that starts empty grows its value buffer by doubling, and each growth of
/// a large buffer (the raw `resource` column's is megabytes) is a copy.
fn finish_presized(b: &mut StringBuilder) -> StringArray {
    let array = b.finish();
    let bytes = array.value_data().len();
    *b = StringBuilder::with_capacity(array.len(), bytes + bytes / 8);
    array
}

macro_rules! downcast {
    ($b:expr, $t:ty) => {
        $b.as_any_mut()
            .downcast_mut::<$t>()
            .expect(concat!("builder is ", stringify!($t)))
    };
}

/// Append one item of a list column.
fn append(b: &mut dyn ArrayBuilder, ty: ColumnType, cell: &Cell<'_>) {
    // Cells were produced by `types::convert` for this very column type, so the variant always
    // matches; a mismatch is appended as null rather than panicking in release builds.
    match ty {
        ColumnType::Utf8 => {
            let b = downcast!(b, StringBuilder);
            match cell {
                Cell::Str(s) => b.append_value(s),
                _ => b.append_null(),
            }
        }
        ColumnType::Boolean => downcast!(b, BooleanBuilder).append_option(match cell {
            Cell::Bool(v) => Some(*v),
            _ => None,
        }),
        ColumnType::Int32 => downcast!(b, Int32Builder).append_option(match cell {
            Cell::Int(v) => i32::try_from(*v).ok(),
            _ => None,
        }),
        ColumnType::Int64 => downcast!(b, Int64Builder).append_option(match cell {
            Cell::Int(v) => Some(*v),
            _ => None,
        }),
        ColumnType::Float64 => downcast!(b, Float64Builder).append_option(match cell {
            Cell::Float(v) => Some(*v),
            _ => None,
        }),
        ColumnType::Decimal(..) => downcast!(b, Decimal128Builder).append_option(match cell {
            Cell::Decimal(v) => Some(*v),
            _ => None,
        }),
        ColumnType::Date32 => downcast!(b, Date32Builder).append_option(match cell {
            Cell::Date(v) => Some(*v),
            _ => None,
        }),
        ColumnType::Timestamp(_) => {
            downcast!(b, TimestampMicrosecondBuilder).append_option(match cell {
                Cell::Timestamp(v) => Some(*v),
                _ => None,
            })
        }
        ColumnType::Time64 => downcast!(b, Time64MicrosecondBuilder).append_option(match cell {
            Cell::Time(v) => Some(*v),
            _ => None,
        }),
    }
}
