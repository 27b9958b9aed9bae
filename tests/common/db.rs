//! The tests' own way into the database, whichever backend the run uses: [`TestDb`] over an
//! SQLite connection or a PostgreSQL client, with the small API the tests need (execute,
//! insert returning the id, typed queries, a logical dump, the schema version, holding the
//! database busy) and SQL written once.
//!
//! SQL is written once, with `?1`-style placeholders (or bare `?`). SQLite takes it as it
//! is; on PostgreSQL each placeholder becomes `$N::<type>` with the type of the Rust value
//! bound to it (`i64` → `int8`, `&str` → `text`, …), so a parameter used where PostgreSQL
//! could not infer its type (`CASE WHEN ?2 IS NULL`) still works and a wrong type fails
//! loudly. Keep the SQL portable: no `strftime`/`julianday`/`datetime` (compute times in Rust
//! with [`ts_in`] / [`now_ts`], the text format both backends store), `IS NOT DISTINCT FROM`
//! rather than `IS` between nullable values, no `rowid`, no `group_concat`; `coalesce`,
//! `||`, `CASE`, `count`, `max` are fine.
//!
//! This module never starts a server (that is `pg.rs`) and never opens the database through
//! orchctl (that is `Env::ctx`); it only speaks SQL to what it is handed.

#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use postgres::types::{FromSql, ToSql, Type};

// ------------------------------------------------------------------------------ values

/// One SQL value as both backends can give it back.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Bool(bool),
    Blob(Vec<u8>),
}

impl Value {
    /// A stable text form for dumps: equal values print equally within one backend.
    fn dump(&self) -> String {
        match self {
            Value::Null => "NULL".into(),
            Value::Int(i) => i.to_string(),
            Value::Real(f) => format!("{f:?}"),
            Value::Text(s) => format!("{s:?}"),
            Value::Bool(b) => b.to_string(),
            Value::Blob(b) => format!("x'{}'", hex(b)),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A Rust type a column can be read as. Integers read as `i64` whatever their width, a
/// PostgreSQL `numeric` with no fraction too (`sum` of a `bigint` is `numeric`); a boolean
/// reads as `i64` 0/1 and an SQLite 0/1 reads as `bool`, so a test written for one backend
/// reads the other's flags.
pub trait FromValue: Sized {
    fn from_value(v: &Value) -> Result<Self, String>;
}

impl FromValue for Value {
    fn from_value(v: &Value) -> Result<Self, String> {
        Ok(v.clone())
    }
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Int(i) => Ok(*i),
            Value::Bool(b) => Ok(i64::from(*b)),
            Value::Real(f) if f.fract() == 0.0 => Ok(*f as i64),
            other => Err(format!("expected an integer, got {other:?}")),
        }
    }
}

impl FromValue for f64 {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Int(i) => Ok(*i as f64),
            Value::Real(f) => Ok(*f),
            other => Err(format!("expected a number, got {other:?}")),
        }
    }
}

impl FromValue for bool {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Bool(b) => Ok(*b),
            Value::Int(0) => Ok(false),
            Value::Int(1) => Ok(true),
            other => Err(format!("expected a boolean, got {other:?}")),
        }
    }
}

impl FromValue for String {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Text(s) => Ok(s.clone()),
            other => Err(format!("expected text, got {other:?}")),
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Null => Ok(None),
            other => T::from_value(other).map(Some),
        }
    }
}

/// One result row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row(pub Vec<Value>);

impl Row {
    /// Column `i` as `T`; panics, naming the column and the value, when it is not one.
    pub fn get<T: FromValue>(&self, i: usize) -> T {
        let v = self
            .0
            .get(i)
            .unwrap_or_else(|| panic!("no column {i} in {:?}", self.0));
        T::from_value(v).unwrap_or_else(|e| panic!("column {i}: {e}"))
    }

    pub fn i64(&self, i: usize) -> i64 {
        self.get(i)
    }

    pub fn opt_i64(&self, i: usize) -> Option<i64> {
        self.get(i)
    }

    pub fn string(&self, i: usize) -> String {
        self.get(i)
    }

    pub fn opt_string(&self, i: usize) -> Option<String> {
        self.get(i)
    }

    pub fn bool(&self, i: usize) -> bool {
        self.get(i)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A whole row as a Rust value: a tuple of [`FromValue`] types.
pub trait FromRow: Sized {
    fn from_row(r: &Row) -> Self;
}

macro_rules! tuple_from_row {
    ($($t:ident $i:tt),+) => {
        impl<$($t: FromValue),+> FromRow for ($($t,)+) {
            fn from_row(r: &Row) -> Self {
                ($(r.get::<$t>($i),)+)
            }
        }
    };
}
tuple_from_row!(A 0);
tuple_from_row!(A 0, B 1);
tuple_from_row!(A 0, B 1, C 2);
tuple_from_row!(A 0, B 1, C 2, D 3);
tuple_from_row!(A 0, B 1, C 2, D 3, E 4);
tuple_from_row!(A 0, B 1, C 2, D 3, E 4, F 5);
tuple_from_row!(A 0, B 1, C 2, D 3, E 4, F 5, G 6);
tuple_from_row!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);

impl FromRow for Row {
    fn from_row(r: &Row) -> Self {
        r.clone()
    }
}

// -------------------------------------------------------------------------- parameters

/// A Rust value bound to a placeholder, with the PostgreSQL type it is bound as.
pub trait Param {
    fn value(&self) -> Value;
    fn pg_type(&self) -> &'static str;
}

macro_rules! int_param {
    ($($t:ty),+) => {$(
        impl Param for $t {
            fn value(&self) -> Value {
                Value::Int(i64::try_from(*self).expect("an integer parameter fits in i64"))
            }
            fn pg_type(&self) -> &'static str {
                "int8"
            }
        }
        impl Param for Option<$t> {
            fn value(&self) -> Value {
                self.as_ref().map_or(Value::Null, Param::value)
            }
            fn pg_type(&self) -> &'static str {
                "int8"
            }
        }
    )+};
}
int_param!(i64, i32, u32, usize, u16);

impl Param for bool {
    fn value(&self) -> Value {
        Value::Bool(*self)
    }
    fn pg_type(&self) -> &'static str {
        "bool"
    }
}

impl Param for f64 {
    fn value(&self) -> Value {
        Value::Real(*self)
    }
    fn pg_type(&self) -> &'static str {
        "float8"
    }
}

impl Param for str {
    fn value(&self) -> Value {
        Value::Text(self.to_string())
    }
    fn pg_type(&self) -> &'static str {
        "text"
    }
}

impl Param for String {
    fn value(&self) -> Value {
        Value::Text(self.clone())
    }
    fn pg_type(&self) -> &'static str {
        "text"
    }
}

impl Param for Option<&str> {
    fn value(&self) -> Value {
        self.map_or(Value::Null, |s| Value::Text(s.to_string()))
    }
    fn pg_type(&self) -> &'static str {
        "text"
    }
}

impl Param for Option<String> {
    fn value(&self) -> Value {
        self.as_deref()
            .map_or(Value::Null, |s| Value::Text(s.to_string()))
    }
    fn pg_type(&self) -> &'static str {
        "text"
    }
}

impl<T: Param + ?Sized> Param for &T {
    fn value(&self) -> Value {
        (**self).value()
    }
    fn pg_type(&self) -> &'static str {
        (**self).pg_type()
    }
}

/// The parameters of one statement: `()`, an array of one type (`[tid]`), a tuple of mixed
/// types (`(tid, "done", None::<i64>)`) or a slice of `&dyn Param`.
pub trait Params {
    fn list(&self) -> Vec<(Value, &'static str)>;
}

impl Params for () {
    fn list(&self) -> Vec<(Value, &'static str)> {
        Vec::new()
    }
}

impl<T: Param, const N: usize> Params for [T; N] {
    fn list(&self) -> Vec<(Value, &'static str)> {
        self.iter().map(|p| (p.value(), p.pg_type())).collect()
    }
}

impl Params for &[&dyn Param] {
    fn list(&self) -> Vec<(Value, &'static str)> {
        self.iter().map(|p| (p.value(), p.pg_type())).collect()
    }
}

macro_rules! tuple_params {
    ($($t:ident $i:tt),+) => {
        impl<$($t: Param),+> Params for ($($t,)+) {
            fn list(&self) -> Vec<(Value, &'static str)> {
                vec![$((self.$i.value(), self.$i.pg_type())),+]
            }
        }
    };
}
tuple_params!(A 0);
tuple_params!(A 0, B 1);
tuple_params!(A 0, B 1, C 2);
tuple_params!(A 0, B 1, C 2, D 3);
tuple_params!(A 0, B 1, C 2, D 3, E 4);
tuple_params!(A 0, B 1, C 2, D 3, E 4, F 5);
tuple_params!(A 0, B 1, C 2, D 3, E 4, F 5, G 6);
tuple_params!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);
tuple_params!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8);
tuple_params!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9);

/// Rewrites `?N` / `?` placeholders into PostgreSQL's `$N::type`, leaving string literals,
/// quoted identifiers and comments alone.
pub fn to_postgres_sql(sql: &str, types: &[&'static str]) -> String {
    let b = sql.as_bytes();
    let mut out = String::with_capacity(sql.len() + 16);
    let mut i = 0;
    let mut next = 0usize;
    while i < b.len() {
        let c = b[i];
        match c {
            b'\'' | b'"' => {
                let end = b[i + 1..]
                    .iter()
                    .position(|&x| x == c)
                    .map_or(b.len(), |p| i + 1 + p + 1);
                out.push_str(&sql[i..end]);
                i = end;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                let end = b[i..]
                    .iter()
                    .position(|&x| x == b'\n')
                    .map_or(b.len(), |p| i + p);
                out.push_str(&sql[i..end]);
                i = end;
            }
            b'?' => {
                let digits = b[i + 1..].iter().take_while(|x| x.is_ascii_digit()).count();
                let n = if digits == 0 {
                    next += 1;
                    next
                } else {
                    let n: usize = sql[i + 1..i + 1 + digits].parse().unwrap();
                    next = next.max(n);
                    n
                };
                let ty = types.get(n - 1).unwrap_or_else(|| {
                    panic!(
                        "placeholder ?{n} has no parameter ({} given): {sql}",
                        types.len()
                    )
                });
                let _ = write!(out, "${n}::{ty}");
                i += 1 + digits;
            }
            _ => {
                let ch = sql[i..].chars().next().unwrap();
                out.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    out
}

/// The bound values with their types: typed statements take one round trip (no separate
/// prepare), which the many small queries of a dump add up to.
type PgParams = Vec<(Box<dyn ToSql + Sync>, Type)>;

fn pg_params(list: &[(Value, &'static str)]) -> PgParams {
    list.iter()
        .map(|(v, ty)| -> (Box<dyn ToSql + Sync>, Type) {
            let t = match *ty {
                "int8" => Type::INT8,
                "float8" => Type::FLOAT8,
                "bool" => Type::BOOL,
                "bytea" => Type::BYTEA,
                _ => Type::TEXT,
            };
            let b: Box<dyn ToSql + Sync> = match v {
                Value::Int(i) => Box::new(*i),
                Value::Real(f) => Box::new(*f),
                Value::Text(s) => Box::new(s.clone()),
                Value::Bool(b) => Box::new(*b),
                Value::Blob(b) => Box::new(b.clone()),
                Value::Null => match t {
                    Type::INT8 => Box::new(None::<i64>),
                    Type::FLOAT8 => Box::new(None::<f64>),
                    Type::BOOL => Box::new(None::<bool>),
                    _ => Box::new(None::<String>),
                },
            };
            (b, t)
        })
        .collect()
}

fn typed(params: &PgParams) -> Vec<(&(dyn ToSql + Sync), Type)> {
    params.iter().map(|(b, t)| (&**b, t.clone())).collect()
}

fn sqlite_params(list: &[(Value, &'static str)]) -> Vec<rusqlite::types::Value> {
    use rusqlite::types::Value as V;
    list.iter()
        .map(|(v, _)| match v {
            Value::Null => V::Null,
            Value::Int(i) => V::Integer(*i),
            Value::Real(f) => V::Real(*f),
            Value::Text(s) => V::Text(s.clone()),
            Value::Bool(b) => V::Integer(i64::from(*b)),
            Value::Blob(b) => V::Blob(b.clone()),
        })
        .collect()
}

/// Any PostgreSQL column, decoded from its binary form into a [`Value`].
struct AnyPg(Value);

impl<'a> FromSql<'a> for AnyPg {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let v = match *ty {
            Type::BOOL => Value::Bool(bool::from_sql(ty, raw)?),
            Type::INT2 => Value::Int(i16::from_sql(ty, raw)?.into()),
            Type::INT4 => Value::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT8 => Value::Int(i64::from_sql(ty, raw)?),
            Type::OID => Value::Int(u32::from_sql(ty, raw)?.into()),
            Type::FLOAT4 => Value::Real(f32::from_sql(ty, raw)?.into()),
            Type::FLOAT8 => Value::Real(f64::from_sql(ty, raw)?),
            Type::NUMERIC => numeric(raw)?,
            Type::BYTEA => Value::Blob(raw.to_vec()),
            // jsonb's binary form is a version byte, then the text.
            Type::JSONB => Value::Text(String::from_utf8(raw[1..].to_vec())?),
            Type::TIMESTAMPTZ | Type::TIMESTAMP => {
                let micros = i64::from_sql(&Type::INT8, raw)?;
                // Microseconds since 2000-01-01 00:00:00 UTC.
                let unix_ms = micros.div_euclid(1000) + 946_684_800_000;
                Value::Text(ts_from_unix_ms(unix_ms))
            }
            _ => match std::str::from_utf8(raw) {
                // text, varchar, bpchar, name, json, unknown, and anything else textual.
                Ok(s) => Value::Text(s.to_string()),
                Err(_) => Value::Text(format!("<{ty}:{}>", hex(raw))),
            },
        };
        Ok(AnyPg(v))
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(AnyPg(Value::Null))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// PostgreSQL's binary `numeric`: an integer when it has no fraction, else a float.
fn numeric(raw: &[u8]) -> Result<Value, Box<dyn std::error::Error + Sync + Send>> {
    let word = |i: usize| -> i64 { i16::from_be_bytes([raw[2 * i], raw[2 * i + 1]]).into() };
    let (ndigits, weight, sign, dscale) = (word(0), word(1), word(2) as u16, word(3));
    if sign == 0xC000 {
        return Ok(Value::Real(f64::NAN));
    }
    let mut int: i128 = 0;
    let mut float = 0f64;
    for d in 0..ndigits {
        let digit = word(4 + d as usize);
        let power = weight - d;
        float += digit as f64 * 10000f64.powi(power as i32);
        if power >= 0 {
            int += i128::from(digit) * 10000i128.pow(power as u32);
        }
    }
    let negative = sign == 0x4000;
    if dscale == 0 {
        let int = if negative { -int } else { int };
        Ok(Value::Int(i64::try_from(int)?))
    } else {
        Ok(Value::Real(if negative { -float } else { float }))
    }
}

// ---------------------------------------------------------------------------- handles

/// Columns that are no data: a host's heartbeat, which every command records (SPEC §12:
/// "every command records its host's `last_seen_at`"), refused ones and read-only ones
/// included. A "nothing changed" dump leaves them out; every other column of the `hosts`
/// row (the host, its boot, whether it was judged dead) is compared.
pub const HEARTBEATS: [(&str, &str); 2] =
    [("hosts", "last_seen_at"), ("orchctl_hosts", "last_seen_at")];

/// Where a test's database is: what [`TestDb::open`] connects to.
#[derive(Clone, Debug)]
pub enum Target {
    Sqlite(PathBuf),
    Postgres(String),
}

/// A plain connection to the test's database, on either backend.
pub enum TestDb {
    Sqlite(rusqlite::Connection),
    Postgres(Box<RefCell<postgres::Client>>),
}

impl TestDb {
    pub fn open(target: &Target) -> TestDb {
        TestDb::try_open(target).unwrap_or_else(|e| panic!("opening {target:?}: {e}"))
    }

    pub fn try_open(target: &Target) -> Result<TestDb, String> {
        match target {
            Target::Sqlite(path) => {
                let c = rusqlite::Connection::open(path).map_err(|e| e.to_string())?;
                c.busy_timeout(Duration::from_secs(10))
                    .map_err(|e| e.to_string())?;
                Ok(TestDb::Sqlite(c))
            }
            Target::Postgres(url) => postgres::Client::connect(url, postgres::NoTls)
                .map(|c| TestDb::Postgres(Box::new(RefCell::new(c))))
                .map_err(|e| pg_error(&e)),
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, TestDb::Postgres(_))
    }

    /// Runs one statement; returns the number of rows it changed.
    pub fn execute(&self, sql: &str, params: impl Params) -> usize {
        let list = params.list();
        match self {
            TestDb::Sqlite(c) => c
                .execute(sql, rusqlite::params_from_iter(sqlite_params(&list)))
                .unwrap_or_else(|e| panic!("{e}: {sql}")),
            TestDb::Postgres(c) => {
                let (sql, boxed) = pg_statement(sql, &list);
                c.borrow_mut()
                    .execute_typed(&sql, &typed(&boxed))
                    .unwrap_or_else(|e| panic!("{}: {sql}", pg_error(&e))) as usize
            }
        }
    }

    /// Runs one `INSERT` and returns the new row's `id` (SQLite: the rowid; PostgreSQL:
    /// `RETURNING id`, appended here).
    pub fn insert(&self, sql: &str, params: impl Params) -> i64 {
        match self {
            TestDb::Sqlite(c) => {
                self.execute(sql, params);
                c.last_insert_rowid()
            }
            TestDb::Postgres(_) => {
                let sql = format!("{} RETURNING id", sql.trim_end().trim_end_matches(';'));
                self.value(&sql, params)
            }
        }
    }

    /// Runs statements without parameters, `;`-separated.
    pub fn batch(&self, sql: &str) {
        match self {
            TestDb::Sqlite(c) => c
                .execute_batch(sql)
                .unwrap_or_else(|e| panic!("{e}: {sql}")),
            TestDb::Postgres(c) => c
                .borrow_mut()
                .batch_execute(sql)
                .unwrap_or_else(|e| panic!("{}: {sql}", pg_error(&e))),
        }
    }

    /// Like [`batch`], returning the error instead of panicking.
    pub fn try_batch(&self, sql: &str) -> Result<(), String> {
        match self {
            TestDb::Sqlite(c) => c.execute_batch(sql).map_err(|e| e.to_string()),
            TestDb::Postgres(c) => c.borrow_mut().batch_execute(sql).map_err(|e| pg_error(&e)),
        }
    }

    /// Every row `sql` returns.
    pub fn rows(&self, sql: &str, params: impl Params) -> Vec<Row> {
        self.try_rows(sql, params)
            .unwrap_or_else(|e| panic!("{e}: {sql}"))
    }

    pub fn try_rows(&self, sql: &str, params: impl Params) -> Result<Vec<Row>, String> {
        let list = params.list();
        match self {
            TestDb::Sqlite(c) => {
                let mut stmt = c.prepare(sql).map_err(|e| e.to_string())?;
                let n = stmt.column_count();
                let rows = stmt
                    .query_map(rusqlite::params_from_iter(sqlite_params(&list)), |r| {
                        (0..n).map(|i| sqlite_value(r, i)).collect()
                    })
                    .map_err(|e| e.to_string())?;
                rows.map(|r| r.map(Row).map_err(|e| e.to_string()))
                    .collect()
            }
            TestDb::Postgres(c) => {
                let (sql, boxed) = pg_statement(sql, &list);
                let rows = c
                    .borrow_mut()
                    .query_typed(&sql, &typed(&boxed))
                    .map_err(|e| pg_error(&e))?;
                Ok(rows
                    .iter()
                    .map(|r| Row((0..r.len()).map(|i| r.get::<_, AnyPg>(i).0).collect()))
                    .collect())
            }
        }
    }

    /// The one row `sql` returns (panics on none or several).
    pub fn row(&self, sql: &str, params: impl Params) -> Row {
        let mut rows = self.rows(sql, params);
        assert_eq!(rows.len(), 1, "expected one row from: {sql}");
        rows.pop().unwrap()
    }

    /// The row `sql` returns, if any (panics on several).
    pub fn optional<R: FromRow>(&self, sql: &str, params: impl Params) -> Option<R> {
        let rows = self.rows(sql, params);
        assert!(rows.len() <= 1, "expected at most one row from: {sql}");
        rows.first().map(R::from_row)
    }

    /// The one row `sql` returns, as a tuple.
    pub fn one<R: FromRow>(&self, sql: &str, params: impl Params) -> R {
        R::from_row(&self.row(sql, params))
    }

    /// Every row, each as a tuple.
    pub fn all<R: FromRow>(&self, sql: &str, params: impl Params) -> Vec<R> {
        self.rows(sql, params).iter().map(R::from_row).collect()
    }

    /// The one value of the one row `sql` returns.
    pub fn value<T: FromValue>(&self, sql: &str, params: impl Params) -> T {
        self.row(sql, params).get(0)
    }

    /// The first column of every row.
    pub fn values<T: FromValue>(&self, sql: &str, params: impl Params) -> Vec<T> {
        self.rows(sql, params).iter().map(|r| r.get(0)).collect()
    }

    /// `SELECT count(*) …` and the like.
    pub fn count(&self, sql: &str) -> i64 {
        self.value(sql, ())
    }

    /// Runs `f` inside one transaction (committed when it returns).
    pub fn transaction<R>(&self, f: impl FnOnce(&TestDb) -> R) -> R {
        self.batch("BEGIN");
        let r = f(self);
        self.batch("COMMIT");
        r
    }

    // ------------------------------------------------------------------ the catalog

    /// The user tables, by name.
    pub fn tables(&self) -> Vec<String> {
        match self {
            TestDb::Sqlite(_) => self.values(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name",
                (),
            ),
            TestDb::Postgres(_) => self.values(
                "SELECT table_name::text FROM information_schema.tables
                 WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'
                 ORDER BY 1",
                (),
            ),
        }
    }

    /// Every user table with its columns in order, from one catalog query.
    pub fn table_columns(&self) -> BTreeMap<String, Vec<String>> {
        let pairs: Vec<(String, String)> = match self {
            TestDb::Sqlite(_) => self.all(
                "SELECT m.name, p.name FROM sqlite_master m JOIN pragma_table_info(m.name) p
                 WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite\\_%' ESCAPE '\\'
                 ORDER BY m.name, p.cid",
                (),
            ),
            TestDb::Postgres(_) => self.all(
                "SELECT c.relname::text, a.attname::text FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                 WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')
                 ORDER BY c.relname, a.attnum",
                (),
            ),
        };
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (t, c) in pairs {
            out.entry(t).or_default().push(c);
        }
        out
    }

    /// The columns of `table`, in order (empty when there is no such table).
    pub fn columns(&self, table: &str) -> Vec<String> {
        match self {
            TestDb::Sqlite(_) => self.values(
                "SELECT name FROM pragma_table_info(?1) ORDER BY cid",
                [table],
            ),
            TestDb::Postgres(_) => self.values(
                "SELECT column_name::text FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name = ?1
                 ORDER BY ordinal_position",
                [table],
            ),
        }
    }

    /// The schema version: SQLite's `PRAGMA user_version`; PostgreSQL's one row of
    /// `orchctl_schema(version)` (0 when the table is missing or empty).
    pub fn schema_version(&self) -> i64 {
        match self {
            TestDb::Sqlite(_) => self.value("PRAGMA user_version", ()),
            TestDb::Postgres(_) => {
                if !self.value::<bool>("SELECT to_regclass('orchctl_schema') IS NOT NULL", ()) {
                    return 0;
                }
                self.optional::<(i64,)>("SELECT version FROM orchctl_schema", ())
                    .map_or(0, |(v,)| v)
            }
        }
    }

    /// Sets the schema version (to make "a database from a newer orchctl").
    pub fn set_schema_version(&self, n: i64) {
        match self {
            TestDb::Sqlite(_) => self.batch(&format!("PRAGMA user_version = {n}")),
            TestDb::Postgres(_) => {
                let changed = self.execute("UPDATE orchctl_schema SET version = ?1", [n]);
                assert_eq!(
                    changed, 1,
                    "orchctl_schema must hold exactly one row (the database is migrated first)"
                );
            }
        }
    }

    /// The schema as text: SQLite's `sqlite_master`; PostgreSQL's columns, indexes,
    /// views and triggers.
    pub fn schema(&self) -> String {
        let mut out = String::new();
        let lines: Vec<Row> = match self {
            TestDb::Sqlite(_) => self.rows(
                "SELECT type, name, coalesce(sql, '') FROM sqlite_master ORDER BY type, name",
                (),
            ),
            TestDb::Postgres(_) => self.rows(
                "SELECT 'column', c.relname || '.' || a.attname,
                        format_type(a.atttypid, a.atttypmod)
                        || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END
                        || coalesce(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), '')
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                 LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
                 WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v', 'm')
                 UNION ALL
                 SELECT 'index', ci.relname::text, pg_get_indexdef(i.indexrelid) FROM pg_index i
                 JOIN pg_class ci ON ci.oid = i.indexrelid
                 JOIN pg_namespace n ON n.oid = ci.relnamespace
                 WHERE n.nspname = current_schema()
                 UNION ALL
                 SELECT 'view', c.relname::text, pg_get_viewdef(c.oid) FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = current_schema() AND c.relkind IN ('v', 'm')
                 UNION ALL
                 SELECT 'trigger', tgname::text, pg_get_triggerdef(t.oid) FROM pg_trigger t
                 JOIN pg_class c ON c.oid = t.tgrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = current_schema() AND NOT t.tgisinternal
                 ORDER BY 1, 2",
                (),
            ),
        };
        for r in lines {
            let _ = writeln!(out, "{} {}: {}", r.string(0), r.string(1), r.string(2));
        }
        out
    }

    /// Every row of every table, ordered by all of its columns: equal dumps mean the same
    /// data on either backend. Left out: the [`HEARTBEATS`], which every command writes.
    pub fn dump_tables(&self) -> BTreeMap<String, Vec<String>> {
        let mut out = BTreeMap::new();
        for (t, columns) in self.table_columns() {
            let columns: Vec<String> = columns
                .into_iter()
                .filter(|c| !HEARTBEATS.contains(&(t.as_str(), c.as_str())))
                .map(|c| format!("\"{c}\""))
                .collect();
            let select = if columns.is_empty() {
                "*".to_string()
            } else {
                columns.join(", ")
            };
            let order: Vec<String> = (1..=columns.len().max(1)).map(|i| i.to_string()).collect();
            let rows = self.rows(
                &format!("SELECT {select} FROM \"{t}\" ORDER BY {}", order.join(", ")),
                (),
            );
            let rows = rows
                .iter()
                .map(|r| r.0.iter().map(Value::dump).collect::<Vec<_>>().join(" | "))
                .collect();
            out.insert(t, rows);
        }
        out
    }

    /// The schema version, the schema and every row, as text (see [`dump_tables`]).
    pub fn dump(&self) -> String {
        let mut out = format!("schema version {}\n", self.schema_version());
        out.push_str(&self.schema());
        for (t, rows) in self.dump_tables() {
            let _ = writeln!(out, "-- {t} ({} rows)", rows.len());
            for r in rows {
                out.push_str(&r);
                out.push('\n');
            }
        }
        out
    }
}

fn pg_statement(sql: &str, list: &[(Value, &'static str)]) -> (String, PgParams) {
    let types: Vec<&'static str> = list.iter().map(|(_, t)| *t).collect();
    (to_postgres_sql(sql, &types), pg_params(list))
}

/// A PostgreSQL error with the server's message and the causes, which `Display` alone
/// leaves out.
pub fn pg_error(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {} ({})", db.severity(), db.message(), db.code().code());
    }
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

fn sqlite_value(r: &rusqlite::Row, i: usize) -> rusqlite::Result<Value> {
    use rusqlite::types::ValueRef;
    Ok(match r.get_ref(i)? {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(f) => Value::Real(f),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    })
}

// ------------------------------------------------------------------------------- busy

/// The database held busy by another client until dropped (or [`Busy::release`]d): on
/// SQLite an open `BEGIN IMMEDIATE` (every write waits, reads go on); on PostgreSQL an
/// open transaction holding `LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE`, which every
/// command that reads or writes jobs waits behind, and every other table in `EXCLUSIVE`
/// mode, so that, as on SQLite, any write waits while plain reads of them go on.
pub struct Busy {
    db: Option<TestDb>,
}

impl Busy {
    pub fn hold(target: &Target) -> Busy {
        let db = TestDb::open(target);
        match &db {
            TestDb::Sqlite(_) => db.batch("BEGIN IMMEDIATE"),
            TestDb::Postgres(_) => {
                db.batch("BEGIN; LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE");
                let others: Vec<String> = db
                    .tables()
                    .into_iter()
                    .filter(|t| t != "jobs")
                    .map(|t| format!("\"{t}\""))
                    .collect();
                if !others.is_empty() {
                    db.batch(&format!(
                        "LOCK TABLE {} IN EXCLUSIVE MODE",
                        others.join(", ")
                    ));
                }
            }
        }
        Busy { db: Some(db) }
    }

    /// Ends the holding transaction (rolled back) and closes the connection.
    pub fn release(mut self) {
        if let Some(db) = self.db.take() {
            db.batch("ROLLBACK");
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(db) = self.db.take() {
            let _ = db.try_batch("ROLLBACK");
        }
    }
}

// ------------------------------------------------------------------------------ times

/// `2026-12-05T22:40:25.123Z`: the UTC text both backends store.
pub fn ts(t: SystemTime) -> String {
    let ms = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    };
    ts_from_unix_ms(ms)
}

/// Now, as stored text.
pub fn now_ts() -> String {
    ts(SystemTime::now())
}

/// `secs` seconds from now (negative: ago), as stored text.
pub fn ts_in(secs: i64) -> String {
    let now = SystemTime::now();
    let t = if secs >= 0 {
        now + Duration::from_secs(secs as u64)
    } else {
        now - Duration::from_secs(secs.unsigned_abs())
    };
    ts(t)
}

/// `secs` seconds from now in the space-separated, second-precision form plain SQL may
/// write (`2026-12-05 22:40:25`).
pub fn ts_plain_in(secs: i64) -> String {
    let t = ts_in(secs);
    format!("{} {}", &t[..10], &t[11..19])
}

pub fn ts_from_unix_ms(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

/// Seconds since the epoch of a stored time (`YYYY-MM-DDTHH:MM:SS[.fff][Z]`, or with a
/// space for the `T`).
pub fn unix_secs(text: &str) -> i64 {
    let b = text.as_bytes();
    let num = |r: std::ops::Range<usize>| -> i64 {
        text.get(r)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a stored time: {text:?}"))
    };
    assert!(b.len() >= 19, "not a stored time: {text:?}");
    let days = days_from_civil(num(0..4), num(5..7), num(8..10));
    days * 86_400 + num(11..13) * 3600 + num(14..16) * 60 + num(17..19)
}

// Howard Hinnant's civil calendar algorithms (proleptic Gregorian, days since 1970-01-01).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The database file and its journals, when the target is SQLite.
pub fn sqlite_files(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for suffix in ["", "-wal", "-journal"] {
        let p = PathBuf::from(format!("{}{suffix}", path.display()));
        if let Ok(b) = std::fs::read(&p) {
            out.push((suffix.to_string(), b));
        }
    }
    out
}
