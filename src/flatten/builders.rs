//! Arrow builders for one view: cells appended column by column, finished into a RecordBatch.

use std::sync::Arc;

use datafusion::arrow::{
    array::{
        ArrayBuilder, ArrayRef, BooleanBuilder, Date32Builder, Decimal128Builder, Float64Builder,
        Int32Builder, Int64Builder, ListBuilder, StringBuilder, Time64MicrosecondBuilder,
        TimestampMicrosecondBuilder, make_builder,
    },
    record_batch::RecordBatch,
};

use crate::view::{Cell, ColumnType, CompiledView};

/// Builders for one view's columns (plus the raw `resource` column when the view has one).
pub(crate) struct ViewBuilders {
    pub view: Arc<CompiledView>,
    columns: Vec<(ColumnType, bool, Box<dyn ArrayBuilder>)>,
    raw: Option<StringBuilder>,
    pub rows: usize,
}

impl ViewBuilders {
    pub fn new(view: Arc<CompiledView>, capacity: usize) -> Self {
        let columns = view
            .columns()
            .iter()
            .zip(view.schema().fields())
            .map(|(c, f)| {
                (
                    c.column_type,
                    c.collection,
                    make_builder(f.data_type(), capacity),
                )
            })
            .collect();
        let raw = view
            .raw_column()
            .then(|| StringBuilder::with_capacity(capacity, capacity * 512));
        ViewBuilders {
            view,
            columns,
            raw,
            rows: 0,
        }
    }

    /// Append one row; `raw` is the resource's JSON text.
    pub fn append(&mut self, row: &[Cell<'_>], raw: &str) {
        for ((ty, collection, b), cell) in self.columns.iter_mut().zip(row) {
            if *collection {
                let list = b
                    .as_any_mut()
                    .downcast_mut::<ListBuilder<Box<dyn ArrayBuilder>>>()
                    .expect("list column has a list builder");
                match cell {
                    Cell::List(items) => {
                        for i in items {
                            append(list.values().as_mut(), *ty, i);
                        }
                        list.append(true);
                    }
                    Cell::Null => list.append(true), // an empty collection is [], not null
                    other => {
                        append(list.values().as_mut(), *ty, other);
                        list.append(true);
                    }
                }
            } else {
                append(b.as_mut(), *ty, cell);
            }
        }
        if let Some(r) = &mut self.raw {
            r.append_value(raw);
        }
        self.rows += 1;
    }

    /// Finish the rows so far into a batch (builders are reset).
    pub fn finish(&mut self) -> Result<RecordBatch, String> {
        let mut arrays: Vec<ArrayRef> = self
            .columns
            .iter_mut()
            .map(|(_, _, b)| b.finish())
            .collect();
        if let Some(r) = &mut self.raw {
            arrays.push(Arc::new(r.finish()));
        }
        self.rows = 0;
        RecordBatch::try_new(self.view.schema().clone(), arrays).map_err(|e| e.to_string())
    }
}

macro_rules! downcast {
    ($b:expr, $t:ty) => {
        $b.as_any_mut()
            .downcast_mut::<$t>()
            .expect(concat!("builder is ", stringify!($t)))
    };
}

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
