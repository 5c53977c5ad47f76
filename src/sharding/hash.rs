//! Sharding keys and the hash functions that map them to buckets.
//!
//! A key enters as text (a SQL literal or a text-format Bind parameter,
//! [`KeyType::parse_text`]) or as bytes (a binary-format Bind parameter,
//! [`KeyType::parse_binary`]) and leaves as a canonical [`KeyValue`]: the
//! same value whichever way it came, so that it always hashes the same.
//! [`hash`] turns that value into 64 bits and [`bucket`] into `hash % B`.
//!
//! Two hash functions:
//!
//! - `postgres`: exactly the placement of `PARTITION BY HASH (col)` with
//!   modulus B (for a single-column key), so a shard's rows can be checked
//!   or moved with Postgres's own functions; [`bucket_sql`] gives the same
//!   bucket as a SQL expression evaluated inside Postgres.
//! - `murmur3`: MurmurHash3 x64_128 of a canonical byte form; see
//!   [`HashFunction::Murmur3`].
//!
//! Postgres hashing is done here by hand: no crate implements the variant
//! of Bob Jenkins' lookup3 that Postgres uses (`hash_bytes_extended` in
//! src/common/hashfn.c), whose seed handling, initial state, block loop and
//! tail placement all differ from the published lookup3.

use std::fmt;

/// The seed Postgres passes to every extended hash function when it
/// computes a hash partition (`HASH_PARTITION_SEED` in partition.h).
const HASH_PARTITION_SEED: u64 = 0x7A5B_2236_7996_DCFD;

/// The constant of Postgres's `hash_combine64` (common/hashfn.h).
const HASH_COMBINE64_CONSTANT: u64 = 0x49a0_f4dd_15e5_a8e3;

/// Which hash function places keys in buckets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HashFunction {
    /// The placement of Postgres's `PARTITION BY HASH (col)`: bucket b of B
    /// holds exactly the rows that a hash partition
    /// `FOR VALUES WITH (MODULUS B, REMAINDER b)` would accept.
    ///
    /// Matches servers on little-endian machines (x86-64, AArch64): Postgres
    /// reads text and uuid bytes in native byte order, so a big-endian
    /// server places those keys elsewhere. Text keys match only under a
    /// deterministic collation (the default, `C`, and libc/ICU collations
    /// unless created with `deterministic = false`), and only in a UTF8
    /// database, since the hash is over the stored bytes.
    Postgres,
    /// MurmurHash3 x64_128 with seed 0; the hash is its first 64-bit half
    /// (h1). The bytes hashed: an integer of any width as its i64 in
    /// little-endian order (8 bytes, so int2, int4 and int8 agree), text as
    /// its UTF-8 bytes, a uuid as its 16 bytes.
    Murmur3,
}

/// The sharding column's type. Varchar hashes exactly like text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    Int2,
    Int4,
    Int8,
    Text,
    Varchar,
    Uuid,
}

/// A key in canonical form: the same value whether it came from a SQL
/// literal, a text Bind parameter or a binary Bind parameter.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeyValue {
    /// Any of int2, int4, int8: Postgres hashes the three alike for the
    /// same value, and so does our murmur3 form.
    Int(i64),
    Text(String),
    Uuid([u8; 16]),
}

impl fmt::Display for KeyValue {
    /// The value as Postgres would print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyValue::Int(v) => write!(f, "{v}"),
            KeyValue::Text(s) => f.write_str(s),
            KeyValue::Uuid(u) => {
                for (i, byte) in u.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        f.write_str("-")?;
                    }
                    write!(f, "{byte:02x}")?;
                }
                Ok(())
            }
        }
    }
}

/// A key that cannot be read as its column's type. The messages are those
/// Postgres gives for the same input, so they can go to the client as is.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("invalid input syntax for type {type_name}: \"{input}\"")]
    InvalidSyntax {
        type_name: &'static str,
        input: String,
    },
    #[error("value \"{input}\" is out of range for type {type_name}")]
    OutOfRange {
        type_name: &'static str,
        input: String,
    },
    /// A binary value of a length the type cannot have.
    #[error("incorrect binary data format for type {type_name}: {len} bytes")]
    InvalidBinary { type_name: &'static str, len: usize },
    /// Bytes that are not UTF-8, or a NUL byte, which Postgres rejects in
    /// any text value. `bytes` is the offending sequence as Postgres shows
    /// it (`0xc3 0x28`).
    #[error("invalid byte sequence for encoding \"UTF8\": {bytes}")]
    InvalidEncoding { bytes: String },
}

impl KeyError {
    /// The SQLSTATE a client is told, as Postgres would for the same value:
    /// 22P02 invalid_text_representation, 22003
    /// numeric_value_out_of_range, 22P03 invalid_binary_representation,
    /// 22021 character_not_in_repertoire.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            KeyError::InvalidSyntax { .. } => "22P02",
            KeyError::OutOfRange { .. } => "22003",
            KeyError::InvalidBinary { .. } => "22P03",
            KeyError::InvalidEncoding { .. } => "22021",
        }
    }
}

impl KeyType {
    /// The type's name in Postgres's messages.
    pub fn sql_name(self) -> &'static str {
        match self {
            KeyType::Int2 => "smallint",
            KeyType::Int4 => "integer",
            KeyType::Int8 => "bigint",
            KeyType::Text => "text",
            KeyType::Varchar => "character varying",
            KeyType::Uuid => "uuid",
        }
    }

    /// Parses a value as Postgres's input function for the type would.
    ///
    /// Integers: optional surrounding whitespace and sign, then decimal
    /// digits, range-checked for the column type. The hexadecimal, octal
    /// and binary prefixes (`0x`, `0o`, `0b`) and `_` digit separators of
    /// Postgres 16 are accepted too: a Postgres 15 server rejects them
    /// itself, and rejecting them here would refuse input a newer server
    /// takes. Uuid: 32 hex digits in either case, optionally with a `-`
    /// after any group of four and optionally in braces. Text: as is.
    pub fn parse_text(self, s: &str) -> Result<KeyValue, KeyError> {
        // Postgres checks the encoding of every text parameter before any
        // input function sees it, and UTF8 has no room for NUL.
        if s.as_bytes().contains(&0) {
            return Err(KeyError::InvalidEncoding {
                bytes: "0x00".into(),
            });
        }
        match self {
            KeyType::Int2 | KeyType::Int4 | KeyType::Int8 => parse_int_text(self, s),
            KeyType::Text | KeyType::Varchar => Ok(KeyValue::Text(s.to_owned())),
            KeyType::Uuid => {
                parse_uuid_text(s)
                    .map(KeyValue::Uuid)
                    .ok_or_else(|| KeyError::InvalidSyntax {
                        type_name: self.sql_name(),
                        input: s.to_owned(),
                    })
            }
        }
    }

    /// Parses a binary-format Bind value. Integers: 2, 4 or 8 bytes
    /// big-endian whatever the column type (a driver may bind an int8
    /// parameter against an int4 column), range-checked for the column
    /// type; text and varchar: UTF-8 bytes; uuid: 16 bytes.
    pub fn parse_binary(self, b: &[u8]) -> Result<KeyValue, KeyError> {
        match self {
            KeyType::Int2 | KeyType::Int4 | KeyType::Int8 => {
                let v = match *b {
                    [x, y] => i64::from(i16::from_be_bytes([x, y])),
                    [x, y, z, w] => i64::from(i32::from_be_bytes([x, y, z, w])),
                    _ => match <[u8; 8]>::try_from(b) {
                        Ok(bytes) => i64::from_be_bytes(bytes),
                        Err(_) => return Err(self.invalid_binary(b)),
                    },
                };
                let (min, max) = self.int_range();
                if v < min || v > max {
                    return Err(KeyError::OutOfRange {
                        type_name: self.sql_name(),
                        input: v.to_string(),
                    });
                }
                Ok(KeyValue::Int(v))
            }
            KeyType::Text | KeyType::Varchar => {
                let s = std::str::from_utf8(b).map_err(|e| invalid_utf8(b, e))?;
                self.parse_text(s)
            }
            KeyType::Uuid => <[u8; 16]>::try_from(b)
                .map(KeyValue::Uuid)
                .map_err(|_| self.invalid_binary(b)),
        }
    }

    fn invalid_binary(self, b: &[u8]) -> KeyError {
        KeyError::InvalidBinary {
            type_name: self.sql_name(),
            len: b.len(),
        }
    }

    /// The range of an integer type (the full i64 range for the others,
    /// which never ask).
    fn int_range(self) -> (i64, i64) {
        match self {
            KeyType::Int2 => (i16::MIN.into(), i16::MAX.into()),
            KeyType::Int4 => (i32::MIN.into(), i32::MAX.into()),
            _ => (i64::MIN, i64::MAX),
        }
    }
}

/// Postgres's `pg_strtoint16/32/64` (numutils.c, as of Postgres 16): the
/// same acceptance, the same range, and the same error kind for the same
/// input, including which of the two a long run of digits followed by junk
/// gets (out of range as soon as the digits overflow).
fn parse_int_text(ty: KeyType, s: &str) -> Result<KeyValue, KeyError> {
    let syntax = || KeyError::InvalidSyntax {
        type_name: ty.sql_name(),
        input: s.to_owned(),
    };
    let range = || KeyError::OutOfRange {
        type_name: ty.sql_name(),
        input: s.to_owned(),
    };
    let (min, _) = ty.int_range();
    let magnitude_of_min = min.unsigned_abs();

    let b = s.as_bytes();
    let mut i = 0;
    while b.get(i).copied().is_some_and(is_c_space) {
        i += 1;
    }
    let negative = match b.get(i) {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    let base: u64 = match (b.get(i), b.get(i + 1)) {
        (Some(b'0'), Some(b'x' | b'X')) => 16,
        (Some(b'0'), Some(b'o' | b'O')) => 8,
        (Some(b'0'), Some(b'b' | b'B')) => 2,
        _ => 10,
    };
    if base != 10 {
        i += 2;
    }
    let digit = |c: u8| char::from(c).to_digit(base as u32).map(u64::from);

    let first_digit = i;
    let mut acc: u64 = 0;
    loop {
        match b.get(i).map(|&c| (c, digit(c))) {
            Some((_, Some(d))) => {
                // Postgres's overflow test, before each step: it decides
                // "out of range" versus "invalid syntax" for digits
                // followed by junk.
                if acc > magnitude_of_min / base {
                    return Err(range());
                }
                acc = acc * base + d;
                i += 1;
            }
            Some((b'_', None)) => {
                // A separator goes between digits; after a 0x/0o/0b prefix
                // Postgres also takes one before the first digit.
                if base == 10 && i == first_digit {
                    return Err(syntax());
                }
                i += 1;
                if b.get(i).and_then(|&c| digit(c)).is_none() {
                    return Err(syntax());
                }
            }
            _ => break,
        }
    }
    if i == first_digit {
        return Err(syntax());
    }
    while b.get(i).copied().is_some_and(is_c_space) {
        i += 1;
    }
    if i != b.len() {
        return Err(syntax());
    }
    let value = if negative {
        if acc > magnitude_of_min {
            return Err(range());
        }
        // For i64::MIN, acc is 2^63: the cast wraps to MIN and so does the
        // negation.
        (acc as i64).wrapping_neg()
    } else {
        if acc >= magnitude_of_min {
            return Err(range());
        }
        acc as i64
    };
    Ok(KeyValue::Int(value))
}

/// C's `isspace` in the C locale, which is what Postgres uses here.
fn is_c_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// Postgres's `string_to_uuid`: an optional `{`, 32 hex digits, each pair
/// of bytes but the last optionally followed by one `-`, then `}` if the
/// brace was opened; nothing else, not even whitespace.
fn parse_uuid_text(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    let braces = b.first() == Some(&b'{');
    let mut i = usize::from(braces);
    let hex = |i: usize| b.get(i).and_then(|&c| char::from(c).to_digit(16));
    let mut out = [0u8; 16];
    for (n, byte) in out.iter_mut().enumerate() {
        *byte = (hex(i)? << 4 | hex(i + 1)?) as u8;
        i += 2;
        if n % 2 == 1 && n < 15 && b.get(i) == Some(&b'-') {
            i += 1;
        }
    }
    if braces {
        if b.get(i) != Some(&b'}') {
            return None;
        }
        i += 1;
    }
    (i == b.len()).then_some(out)
}

/// The error Postgres gives for bytes that are not UTF-8: the bad sequence,
/// as far as it goes.
fn invalid_utf8(b: &[u8], e: std::str::Utf8Error) -> KeyError {
    let start = e.valid_up_to();
    let len = e.error_len().unwrap_or(b.len() - start);
    let bytes = b[start..start + len]
        .iter()
        .map(|byte| format!("0x{byte:02x}"))
        .collect::<Vec<_>>()
        .join(" ");
    KeyError::InvalidEncoding { bytes }
}

/// The 64-bit hash of a key.
///
/// The value alone decides the hash (an `Int` hashes alike for int2, int4
/// and int8; text and varchar alike): `ty` is passed so that a type whose
/// hash depends on the column type could be added without changing the
/// callers.
pub fn hash(f: HashFunction, _ty: KeyType, v: &KeyValue) -> u64 {
    match f {
        HashFunction::Postgres => postgres_partition_hash(v),
        HashFunction::Murmur3 => murmur3_hash(v),
    }
}

/// The key's bucket: `hash % buckets`. A `buckets` of 0 is taken as 1
/// rather than dividing by zero.
pub fn bucket(f: HashFunction, ty: KeyType, v: &KeyValue, buckets: u32) -> u32 {
    (hash(f, ty, v) % u64::from(buckets.max(1))) as u32
}

/// A SQL expression that computes inside Postgres the bucket of the column
/// expression `column` (already quoted as needed) of type `ty`, as a
/// bigint; `None` for murmur3, which Postgres cannot compute.
///
/// The form, for an int4 column `k` and B = 8:
///
/// ```sql
/// ((hashint4extended(k, 8816678312871386365)::numeric
///   + 23752253665144318179) % 18446744073709551616 % 8)::int8
/// ```
///
/// that is the type's extended hash function with the partition seed,
/// then `hash_combine64(0, h) = h + 0x49a0f4dd15e5a8e3 (mod 2^64)` and the
/// unsigned `% B`, done in numeric because the hash comes back as a signed
/// bigint and the sum overflows bigint (adding 2^64 keeps it positive).
/// This needs no partitioned table, unlike `satisfies_hash_partition`,
/// and uses only immutable built-in functions, so it works in a WHERE
/// clause, a `COPY (SELECT ...)` filter and a publication row filter.
pub fn bucket_sql(f: HashFunction, ty: KeyType, column: &str, buckets: u32) -> Option<String> {
    if f != HashFunction::Postgres {
        return None;
    }
    let function = match ty {
        KeyType::Int2 => "hashint2extended",
        KeyType::Int4 => "hashint4extended",
        KeyType::Int8 => "hashint8extended",
        KeyType::Text | KeyType::Varchar => "hashtextextended",
        KeyType::Uuid => "uuid_hash_extended",
    };
    let seed = HASH_PARTITION_SEED as i64;
    let two_64 = 1u128 << 64;
    let offset = two_64 + u128::from(HASH_COMBINE64_CONSTANT);
    let buckets = buckets.max(1);
    Some(format!(
        "(({function}({column}, {seed})::numeric + {offset}) % {two_64} % {buckets})::int8"
    ))
}

/// [`bucket_sql`] for either hash function: murmur3 through the SQL
/// functions shardgate installs for bucket moves
/// (`src/reshard/murmur3.sql`, schema `shardgate`). User-defined
/// functions are not allowed in publication row filters, so this is for
/// queries and triggers only.
pub fn bucket_sql_installed(f: HashFunction, ty: KeyType, column: &str, buckets: u32) -> String {
    if let Some(sql) = bucket_sql(f, ty, column, buckets) {
        return sql;
    }
    let h1 = match ty {
        KeyType::Int2 | KeyType::Int4 | KeyType::Int8 => {
            format!("shardgate.murmur3_h1_int(({column})::int8)")
        }
        KeyType::Text | KeyType::Varchar => {
            format!("shardgate.murmur3_h1(convert_to(({column})::text, 'UTF8'))")
        }
        KeyType::Uuid => format!("shardgate.murmur3_h1(uuid_send({column}))"),
    };
    format!("({h1} % {})::int8", buckets.max(1))
}

/// `compute_partition_hash_value` (partbounds.c) for one non-null column:
/// the type's extended hash with the partition seed, combined into 0.
fn postgres_partition_hash(v: &KeyValue) -> u64 {
    let h = match v {
        KeyValue::Int(i) => hash_int8_extended(*i, HASH_PARTITION_SEED),
        // hashtextextended under a deterministic collation.
        KeyValue::Text(s) => hash_bytes_extended(s.as_bytes(), HASH_PARTITION_SEED),
        KeyValue::Uuid(u) => hash_bytes_extended(u, HASH_PARTITION_SEED),
    };
    hash_combine64(0, h)
}

/// `hash_combine64` (common/hashfn.h).
fn hash_combine64(a: u64, b: u64) -> u64 {
    a ^ b
        .wrapping_add(HASH_COMBINE64_CONSTANT)
        .wrapping_add(a << 54)
        .wrapping_add(a >> 7)
}

/// `hashint8extended`: folds the high half into the low half so that a
/// value hashes the same as an int2, int4 or int8 (`hashint2extended` and
/// `hashint4extended` hash the value as a uint32 directly). A side effect:
/// i64::MAX and i32::MIN collide, as do i64::MIN and i32::MAX.
fn hash_int8_extended(v: i64, seed: u64) -> u64 {
    let low = v as u32;
    let high = (v >> 32) as u32;
    let folded = low ^ if v >= 0 { high } else { !high };
    hash_uint32_extended(folded, seed)
}

/// Postgres's `hash_bytes_uint32_extended`: the same as
/// [`hash_bytes_extended`] of the 4 bytes on a little-endian machine.
fn hash_uint32_extended(k: u32, seed: u64) -> u64 {
    let mut s = Lookup3::new(4, seed);
    s.a = s.a.wrapping_add(k);
    s.finish()
}

/// Postgres's `hash_bytes_extended` (hash_any_extended), as computed on a
/// little-endian machine. Unlike the published lookup3 it starts from
/// 0x9e3779b9 + len + 3923095, folds a non-zero seed in with one extra
/// mix, mixes every whole 12-byte block (even the last), always runs the
/// final mix (even for no bytes), and adds tail bytes 8..=10 to c one byte
/// up, from bit 8: lookup2 kept the length in c's low byte, and Postgres
/// kept that layout (and its comment) though the length now goes into the
/// initial state.
fn hash_bytes_extended(k: &[u8], seed: u64) -> u64 {
    let mut s = Lookup3::new(k.len() as u32, seed);
    let mut blocks = k.chunks_exact(12);
    for block in &mut blocks {
        s.a = s.a.wrapping_add(le32(&block[0..4]));
        s.b = s.b.wrapping_add(le32(&block[4..8]));
        s.c = s.c.wrapping_add(le32(&block[8..12]));
        s.mix();
    }
    for (i, &byte) in blocks.remainder().iter().enumerate() {
        let byte = u32::from(byte);
        match i {
            0..=3 => s.a = s.a.wrapping_add(byte << (8 * i)),
            4..=7 => s.b = s.b.wrapping_add(byte << (8 * (i - 4))),
            _ => s.c = s.c.wrapping_add(byte << (8 * (i - 7))),
        }
    }
    s.finish()
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// The internal state of lookup3 as Postgres runs it.
struct Lookup3 {
    a: u32,
    b: u32,
    c: u32,
}

impl Lookup3 {
    fn new(len: u32, seed: u64) -> Lookup3 {
        let init = 0x9e37_79b9u32.wrapping_add(len).wrapping_add(3_923_095);
        let mut s = Lookup3 {
            a: init,
            b: init,
            c: init,
        };
        // The seed counts as a 12-byte block of (high, low, 0); a zero seed
        // leaves the state alone, so the seed-0 hash extends the 32-bit one.
        if seed != 0 {
            s.a = s.a.wrapping_add((seed >> 32) as u32);
            s.b = s.b.wrapping_add(seed as u32);
            s.mix();
        }
        s
    }

    fn mix(&mut self) {
        let Lookup3 { a, b, c } = self;
        *a = a.wrapping_sub(*c);
        *a ^= c.rotate_left(4);
        *c = c.wrapping_add(*b);
        *b = b.wrapping_sub(*a);
        *b ^= a.rotate_left(6);
        *a = a.wrapping_add(*c);
        *c = c.wrapping_sub(*b);
        *c ^= b.rotate_left(8);
        *b = b.wrapping_add(*a);
        *a = a.wrapping_sub(*c);
        *a ^= c.rotate_left(16);
        *c = c.wrapping_add(*b);
        *b = b.wrapping_sub(*a);
        *b ^= a.rotate_left(19);
        *a = a.wrapping_add(*c);
        *c = c.wrapping_sub(*b);
        *c ^= b.rotate_left(4);
        *b = b.wrapping_add(*a);
    }

    /// lookup3's `final`, then the 64-bit result (b, c).
    fn finish(mut self) -> u64 {
        let Lookup3 { a, b, c } = &mut self;
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(14));
        *a ^= *c;
        *a = a.wrapping_sub(c.rotate_left(11));
        *b ^= *a;
        *b = b.wrapping_sub(a.rotate_left(25));
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(16));
        *a ^= *c;
        *a = a.wrapping_sub(c.rotate_left(4));
        *b ^= *a;
        *b = b.wrapping_sub(a.rotate_left(14));
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(24));
        (u64::from(*b) << 32) | u64::from(*c)
    }
}

/// See [`HashFunction::Murmur3`] for the bytes hashed.
fn murmur3_hash(v: &KeyValue) -> u64 {
    let int_bytes;
    let bytes: &[u8] = match v {
        KeyValue::Int(i) => {
            int_bytes = i.to_le_bytes();
            &int_bytes
        }
        KeyValue::Text(s) => s.as_bytes(),
        KeyValue::Uuid(u) => u,
    };
    let h = murmur3::murmur3_x64_128(&mut &bytes[..], 0)
        .expect("reading from a byte slice cannot fail");
    // The crate returns h2:h1; h1 is the low half.
    h as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UUID_A: [u8; 16] = [
        0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38, 0x0a,
        0x11,
    ];

    fn text(s: &str) -> KeyValue {
        KeyValue::Text(s.to_owned())
    }

    /// From Postgres 15.18 on x86-64:
    /// `SELECT x, hashint8extended(x, 8816678312871386365) FROM unnest(...)`.
    #[test]
    fn int8_extended_matches_postgres() {
        let seed = HASH_PARTITION_SEED;
        for (v, expected) in [
            (0i64, -4403592609991167795i64),
            (1, 5968994663651403477),
            (-1, -5017072347659237694),
            (42, 7363975540656877951),
            (i64::MAX, 4938542303000433043),
            (i64::MIN, -6050265599104649060),
            (i32::MAX.into(), -6050265599104649060),
            (i32::MIN.into(), 4938542303000433043),
            (i16::MAX.into(), -6436696229286267413),
            (i16::MIN.into(), 5885242512097991578),
        ] {
            assert_eq!(hash_int8_extended(v, seed) as i64, expected, "{v}");
        }
        // hashint8extended(42, 0), the unseeded path.
        assert_eq!(hash_int8_extended(42, 0) as i64, 8010225493015854792);
    }

    /// `SELECT hashtextextended(t, 8816678312871386365), hashtextextended(t, 0)`
    /// on Postgres 15.18 (UTF8, C.UTF-8): lengths 0, 1, 3, 4, 11, 12
    /// (one whole block, no tail), 13 and a multi-byte string.
    #[test]
    fn text_extended_matches_postgres() {
        for (s, seeded, unseeded) in [
            ("", -5700645584453517373i64, -6939563903564495251i64),
            ("a", -6705225459120232837, 3591986179850072241),
            ("abc", 3628778498291917250, -6747756470228489321),
            ("abcd", 4029384952263848046, -1038429303365892052),
            ("hello world", 7664296498819024037, 6947366892317592103),
            ("abcdefghijkl", -7876791541613377658, -7556637188122330412),
            ("abcdefghijklm", -6785754114725280077, 8871624171452417744),
            (
                "héllo wörld ✓ 日本語",
                -1933196208640823528,
                -4081831178708560169,
            ),
        ] {
            let b = s.as_bytes();
            assert_eq!(
                hash_bytes_extended(b, HASH_PARTITION_SEED) as i64,
                seeded,
                "{s:?}"
            );
            assert_eq!(hash_bytes_extended(b, 0) as i64, unseeded, "{s:?}");
        }
    }

    /// `SELECT uuid_hash_extended(u, 8816678312871386365)` on Postgres 15.18.
    #[test]
    fn uuid_extended_matches_postgres() {
        for (u, expected) in [
            ([0u8; 16], -5281082146396728638i64),
            (UUID_A, 424513190990560493),
            ([0xff; 16], -148986464341306210),
        ] {
            assert_eq!(
                hash_bytes_extended(&u, HASH_PARTITION_SEED) as i64,
                expected
            );
        }
    }

    /// Rows inserted into 8-way `PARTITION BY HASH` tables on Postgres
    /// 15.18, and the partition each landed in.
    #[test]
    fn buckets_match_postgres_partitions() {
        let pg = HashFunction::Postgres;
        for (v, expected) in [
            (i64::MIN, 7),
            (-1, 5),
            (0, 0),
            (1, 0),
            (42, 2),
            (i64::MAX, 6),
        ] {
            assert_eq!(bucket(pg, KeyType::Int8, &KeyValue::Int(v), 8), expected);
        }
        for (s, expected) in [
            ("", 6),
            ("a", 6),
            ("abc", 5),
            ("hello world", 0),
            ("héllo wörld ✓ 日本語", 3),
        ] {
            assert_eq!(bucket(pg, KeyType::Text, &text(s), 8), expected, "{s:?}");
        }
        for (u, expected) in [([0u8; 16], 5), (UUID_A, 0), ([0xff; 16], 1)] {
            assert_eq!(bucket(pg, KeyType::Uuid, &KeyValue::Uuid(u), 8), expected);
        }
        // satisfies_hash_partition('p8'::regclass, 1000, r, 42::int8) holds
        // for r = 514 only.
        assert_eq!(bucket(pg, KeyType::Int8, &KeyValue::Int(42), 1000), 514);
    }

    #[test]
    fn uint32_hash_is_the_four_byte_hash() {
        for k in [0u32, 1, 42, 0x8000_0000, u32::MAX] {
            for seed in [0, HASH_PARTITION_SEED] {
                assert_eq!(
                    hash_uint32_extended(k, seed),
                    hash_bytes_extended(&k.to_le_bytes(), seed)
                );
            }
        }
    }

    /// Reference values from the mmh3 Python package (the C MurmurHash3):
    /// `mmh3.hash64(bytes, 0, signed=False)[0]`.
    #[test]
    fn murmur3_fixed_vectors() {
        let m = HashFunction::Murmur3;
        for (v, expected) in [
            (KeyValue::Int(0), 0x28df_63b7_cc57_c3cb_u64),
            (KeyValue::Int(42), 0xb6ac_c399_89d2_7df8),
            (KeyValue::Int(-1), 0xa0e4_b27a_1aba_ed73),
            (KeyValue::Int(i64::MAX), 0x6c76_ebcb_dad6_69d4),
            (KeyValue::Int(i64::MIN), 0x0115_9dfe_b459_3227),
            (text(""), 0),
            (text("hello world"), 0x533f_6046_eb7f_610e),
            (text("héllo wörld ✓ 日本語"), 0xf03c_d8ca_599c_c902),
            (text("abcdefghijklmnopq"), 0x7564_747f_88bd_a657),
            (KeyValue::Uuid(UUID_A), 0xf3dc_9b88_e053_728f),
        ] {
            assert_eq!(hash(m, KeyType::Int8, &v), expected, "{v:?}");
        }
        assert_eq!(bucket(m, KeyType::Int4, &KeyValue::Int(42), 8), 0);
        assert_eq!(bucket(m, KeyType::Text, &text("hello world"), 8), 6);
    }

    #[test]
    fn int_types_hash_alike() {
        for f in [HashFunction::Postgres, HashFunction::Murmur3] {
            for v in [-32768i64, -1, 0, 1, 12345, 32767] {
                let keys = [KeyType::Int2, KeyType::Int4, KeyType::Int8]
                    .map(|ty| hash(f, ty, &ty.parse_text(&v.to_string()).unwrap()));
                assert!(keys.iter().all(|&h| h == keys[0]), "{f:?} {v}");
            }
        }
    }

    #[test]
    fn ints_parse_like_postgres() {
        let ok = |ty: KeyType, s: &str, v: i64| {
            assert_eq!(ty.parse_text(s), Ok(KeyValue::Int(v)), "{ty:?} {s:?}");
        };
        ok(KeyType::Int4, " 42 ", 42);
        ok(KeyType::Int4, "+42", 42);
        ok(KeyType::Int4, "-0", 0);
        ok(KeyType::Int4, "\t\n42\r\x0b\x0c", 42);
        ok(KeyType::Int2, "00000000000000000000042", 42);
        ok(KeyType::Int2, "-32768", -32768);
        ok(KeyType::Int2, "32767", 32767);
        ok(KeyType::Int4, "-2147483648", i32::MIN.into());
        ok(KeyType::Int8, "-9223372036854775808", i64::MIN);
        ok(KeyType::Int8, "9223372036854775807", i64::MAX);
        // Postgres 16 syntax.
        ok(KeyType::Int4, "0x1F", 31);
        ok(KeyType::Int4, "-0X_1f", -31);
        ok(KeyType::Int4, "0o17", 15);
        ok(KeyType::Int4, "0b101", 5);
        ok(KeyType::Int4, "1_000_000", 1_000_000);
        ok(KeyType::Int2, "-0x8000", -32768);
        ok(KeyType::Int8, "0x7FFFFFFFFFFFFFFF", i64::MAX);

        let err = |ty: KeyType, s: &str, code: &str| {
            let e = ty.parse_text(s).expect_err(s);
            assert_eq!(e.sqlstate(), code, "{ty:?} {s:?}: {e}");
        };
        for s in [
            "", " ", "-", "+", "4 2", "42.", "1e3", "abc", "0x", "_1", "1_", "1__0", "0x1g", "0o8",
            "0b2", "--1", "+-1", "1x",
        ] {
            err(KeyType::Int4, s, "22P02");
        }
        err(KeyType::Int2, "32768", "22003");
        err(KeyType::Int2, "-32769", "22003");
        err(KeyType::Int4, "2147483648", "22003");
        err(KeyType::Int8, "9223372036854775808", "22003");
        err(KeyType::Int8, "-9223372036854775809", "22003");
        err(KeyType::Int8, "0x8000000000000000", "22003");
        // As in Postgres: digits that overflow before the junk is reached
        // are out of range; junk reached first is a syntax error.
        err(KeyType::Int2, "99999x", "22003");
        err(KeyType::Int2, "32768x", "22P02");

        assert_eq!(
            KeyType::Int4.parse_text("abc").unwrap_err().to_string(),
            "invalid input syntax for type integer: \"abc\""
        );
        assert_eq!(
            KeyType::Int2.parse_text("99999").unwrap_err().to_string(),
            "value \"99999\" is out of range for type smallint"
        );
    }

    #[test]
    fn binary_ints_accept_any_width_and_check_the_range() {
        assert_eq!(
            KeyType::Int4.parse_binary(&42i64.to_be_bytes()),
            Ok(KeyValue::Int(42))
        );
        assert_eq!(
            KeyType::Int8.parse_binary(&(-7i16).to_be_bytes()),
            Ok(KeyValue::Int(-7))
        );
        let e = KeyType::Int2
            .parse_binary(&99999i32.to_be_bytes())
            .unwrap_err();
        assert_eq!(e.sqlstate(), "22003");
        assert_eq!(
            e.to_string(),
            "value \"99999\" is out of range for type smallint"
        );
        for bytes in [&[][..], &[1], &[1, 2, 3], &[0; 16]] {
            let e = KeyType::Int8.parse_binary(bytes).unwrap_err();
            assert_eq!(e.sqlstate(), "22P03", "{bytes:?}");
        }
    }

    #[test]
    fn uuids_parse_in_every_postgres_form() {
        let canonical = KeyValue::Uuid(UUID_A);
        for s in [
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "{a0eebc999c0b4ef8bb6d6bb9bd380a11}",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
            "{a0eebc99-9c0b4ef8-bb6d6bb9-bd380a11}",
        ] {
            assert_eq!(KeyType::Uuid.parse_text(s), Ok(canonical.clone()), "{s}");
        }
        assert_eq!(KeyType::Uuid.parse_binary(&UUID_A), Ok(canonical.clone()));
        assert_eq!(
            canonical.to_string(),
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
        );
        // Each of these is rejected by Postgres 15.18 too.
        for s in [
            "",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-",
            " a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 ",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "a0eebc9-99c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99--9c0b-4ef8-bb6d-6bb9bd380a11",
            "-a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc999c0b4ef8bb6d6bb9bd380a1",
            "a0eebc999c0b4ef8bb6d6bb9bd380a111",
            "g0eebc999c0b4ef8bb6d6bb9bd380a11",
        ] {
            let e = KeyType::Uuid.parse_text(s).unwrap_err();
            assert_eq!(e.sqlstate(), "22P02", "{s}");
            assert_eq!(
                e.to_string(),
                format!("invalid input syntax for type uuid: \"{s}\"")
            );
        }
        let e = KeyType::Uuid.parse_binary(&[0; 15]).unwrap_err();
        assert_eq!(e.sqlstate(), "22P03");
    }

    #[test]
    fn text_is_taken_as_is_and_must_be_utf8_without_nul() {
        for ty in [KeyType::Text, KeyType::Varchar] {
            assert_eq!(ty.parse_text(" Ab "), Ok(text(" Ab ")));
            assert_eq!(ty.parse_binary("日本".as_bytes()), Ok(text("日本")));
            let e = ty.parse_binary(&[b'a', 0xc3, 0x28]).unwrap_err();
            assert_eq!(e.sqlstate(), "22021");
            assert_eq!(
                e.to_string(),
                "invalid byte sequence for encoding \"UTF8\": 0xc3"
            );
            assert_eq!(
                ty.parse_binary(&[0xe6, 0x97]).unwrap_err().sqlstate(),
                "22021"
            );
            let e = ty.parse_text("a\0b").unwrap_err();
            assert_eq!(
                e.to_string(),
                "invalid byte sequence for encoding \"UTF8\": 0x00"
            );
        }
        assert_eq!(
            hash(HashFunction::Postgres, KeyType::Text, &text("x")),
            hash(HashFunction::Postgres, KeyType::Varchar, &text("x"))
        );
    }

    #[test]
    fn bucket_sql_form() {
        assert_eq!(
            bucket_sql(HashFunction::Postgres, KeyType::Int4, "k", 8).as_deref(),
            Some(
                "((hashint4extended(k, 8816678312871386365)::numeric + 23752253665144318179) \
                 % 18446744073709551616 % 8)::int8"
            )
        );
        assert!(
            bucket_sql(HashFunction::Postgres, KeyType::Varchar, "\"K\"", 3)
                .unwrap()
                .starts_with("((hashtextextended(\"K\", ")
        );
        assert_eq!(
            bucket_sql(HashFunction::Murmur3, KeyType::Int8, "k", 8),
            None
        );
    }

    #[test]
    fn zero_buckets_is_one_bucket() {
        for f in [HashFunction::Postgres, HashFunction::Murmur3] {
            assert_eq!(bucket(f, KeyType::Int8, &KeyValue::Int(42), 0), 0);
        }
    }

    #[test]
    fn config_names() {
        #[derive(serde::Deserialize)]
        struct Sharding {
            function: HashFunction,
            types: Vec<KeyType>,
        }
        let s: Sharding = toml::from_str(
            "function = \"murmur3\"\ntypes = [\"int2\", \"int4\", \"int8\", \"text\", \"varchar\", \"uuid\"]",
        )
        .unwrap();
        assert_eq!(s.function, HashFunction::Murmur3);
        assert_eq!(s.types.len(), 6);
    }

    proptest! {
        /// Text and binary forms of the same integer give the same key, for
        /// every width a driver may send that fits the column.
        #[test]
        fn int_text_and_binary_agree(v in any::<i64>()) {
            let from_text = KeyType::Int8.parse_text(&v.to_string()).unwrap();
            prop_assert_eq!(&from_text, &KeyValue::Int(v));
            prop_assert_eq!(KeyType::Int8.parse_binary(&v.to_be_bytes()).unwrap(), from_text);
            for ty in [KeyType::Int2, KeyType::Int4] {
                let (min, max) = ty.int_range();
                let text = ty.parse_text(&format!(" {v} "));
                let binary = ty.parse_binary(&v.to_be_bytes());
                if (min..=max).contains(&v) {
                    prop_assert_eq!(text, Ok(KeyValue::Int(v)));
                    prop_assert_eq!(binary, Ok(KeyValue::Int(v)));
                } else {
                    prop_assert_eq!(text.unwrap_err().sqlstate(), "22003");
                    prop_assert_eq!(binary.unwrap_err().sqlstate(), "22003");
                }
            }
        }

        #[test]
        fn uuid_text_and_binary_agree(u in any::<[u8; 16]>()) {
            let v = KeyValue::Uuid(u);
            let printed = v.to_string();
            prop_assert_eq!(KeyType::Uuid.parse_text(&printed), Ok(v.clone()));
            prop_assert_eq!(KeyType::Uuid.parse_text(&printed.to_uppercase()), Ok(v.clone()));
            prop_assert_eq!(KeyType::Uuid.parse_text(&printed.replace('-', "")), Ok(v.clone()));
            prop_assert_eq!(KeyType::Uuid.parse_binary(&u), Ok(v));
        }

        #[test]
        fn parsers_never_panic(s in ".{0,40}", b in proptest::collection::vec(any::<u8>(), 0..40)) {
            for ty in [KeyType::Int2, KeyType::Int4, KeyType::Int8, KeyType::Text, KeyType::Uuid] {
                let _ = ty.parse_text(&s);
                let _ = ty.parse_binary(&b);
            }
        }
    }
}
