//! The pipeline's words as SQL values: a stage, an agent or a job status is stored as its
//! text, and text that names none of them is an error naming the word (a row written by
//! another tool with a typo must say so, not be read as something else).

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

use crate::pipeline::{Agent, Awaiting, JobStatus, Stage};

macro_rules! sql_word {
    ($ty:ident) => {
        impl FromSql for $ty {
            fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
                let text = v.as_str()?;
                text.parse::<$ty>()
                    .map_err(|e| FromSqlError::Other(e.into()))
            }
        }

        impl ToSql for $ty {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }
    };
}

sql_word!(Stage);
sql_word!(Agent);
sql_word!(JobStatus);
sql_word!(Awaiting);
