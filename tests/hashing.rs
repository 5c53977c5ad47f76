//! The `postgres` hash function against a real Postgres: for every
//! supported key type, rows inserted into a `PARTITION BY HASH (k)` table
//! with 8 partitions must land in partition `bucket(.., 8)`;
//! `satisfies_hash_partition` must agree with `bucket` for other moduli,
//! and so must `bucket_sql` evaluated by Postgres. The text and binary
//! forms Postgres itself produces for each stored value must parse back to
//! the same key, and text parsing must accept, reject and word its errors
//! as Postgres does.

mod common;

use common::{direct, runtime};
use futures::TryStreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shardgate::sharding::hash::{bucket, bucket_sql, HashFunction, KeyType, KeyValue};
use tokio_postgres::Client;

const PG: HashFunction = HashFunction::Postgres;

/// The modulus of the partitioned tables.
const PARTITIONS: u32 = 8;

/// Moduli checked through `satisfies_hash_partition` and `bucket_sql`,
/// besides the partition count: a power of two and one that is not (the
/// unsigned 64-bit remainder only shows its sign handling there).
const MODULI: [u32; 2] = [1024, 1000];

fn sql_type(ty: KeyType) -> &'static str {
    match ty {
        KeyType::Int2 => "int2",
        KeyType::Int4 => "int4",
        KeyType::Int8 => "int8",
        KeyType::Text => "text",
        KeyType::Varchar => "varchar",
        KeyType::Uuid => "uuid",
    }
}

/// The type's binary output function, to get the bytes a driver would
/// receive (and send) for a value.
fn send_function(ty: KeyType) -> &'static str {
    match ty {
        KeyType::Int2 => "int2send",
        KeyType::Int4 => "int4send",
        KeyType::Int8 => "int8send",
        KeyType::Text => "textsend",
        KeyType::Varchar => "varcharsend",
        KeyType::Uuid => "uuid_send",
    }
}

/// Keys for an integer column: the extremes of every integer width that
/// fit, the pairs that hashint8extended's folding makes collide, small
/// values, and random values of every magnitude. An int2 column gets all
/// 65536 values.
fn int_keys(ty: KeyType, rng: &mut StdRng) -> Vec<KeyValue> {
    let (min, max): (i64, i64) = match ty {
        KeyType::Int2 => (i16::MIN.into(), i16::MAX.into()),
        KeyType::Int4 => (i32::MIN.into(), i32::MAX.into()),
        _ => (i64::MIN, i64::MAX),
    };
    if ty == KeyType::Int2 {
        return (min..=max).map(KeyValue::Int).collect();
    }
    let mut v: Vec<i64> = vec![0, 1, -1, 2, -2, 42, -42, min, max, min + 1, max - 1];
    for edge in [
        i16::MIN.into(),
        i16::MAX.into(),
        i32::MIN.into(),
        i32::MAX.into(),
        1 << 32,
        -(1 << 32),
        u32::MAX.into(),
    ] {
        let edge: i64 = edge;
        v.extend([edge - 1, edge, edge + 1]);
    }
    v.retain(|x| (min..=max).contains(x));
    v.extend((-1000..=1000).step_by(3));
    for _ in 0..1500 {
        v.push(rng.gen_range(min..=max));
    }
    for _ in 0..1500 {
        let shift = rng.gen_range(0..64);
        v.push((rng.gen::<i64>() >> shift).clamp(min, max));
    }
    v.into_iter().map(KeyValue::Int).collect()
}

/// Keys for a text column: every byte length 0..=40 many times over (each
/// tail length of every 12-byte block count), mixed multi-byte strings,
/// and a few fixed ones.
fn text_keys(rng: &mut StdRng) -> Vec<KeyValue> {
    const ALPHABET: &[char] = &[
        'a', 'b', 'z', 'A', 'Z', '0', '9', ' ', '_', '\'', '"', '\\', '%', 'é', 'ß', 'ø', 'Ж', '✓',
        '日', '本', '😀', '\u{7f}', '\u{80}', '\u{ffff}',
    ];
    let mut v: Vec<String> = vec![
        String::new(),
        "a".into(),
        "hello world".into(),
        "héllo wörld ✓ 日本語".into(),
        "😀".into(),
        "x".repeat(1000),
        "日本語".repeat(100),
    ];
    for len in 0..=40 {
        for _ in 0..25 {
            v.push(
                (0..len)
                    .map(|_| char::from(rng.gen_range(0x20u8..0x7f)))
                    .collect(),
            );
        }
    }
    for _ in 0..1000 {
        let len = rng.gen_range(0..60);
        v.push(
            (0..len)
                .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())])
                .collect(),
        );
    }
    v.into_iter().map(KeyValue::Text).collect()
}

fn uuid_keys(rng: &mut StdRng) -> Vec<KeyValue> {
    let mut v = vec![[0u8; 16], [0xff; 16]];
    for _ in 0..3000 {
        v.push(rng.gen());
    }
    v.into_iter().map(KeyValue::Uuid).collect()
}

fn keys(ty: KeyType) -> Vec<KeyValue> {
    let mut rng = StdRng::seed_from_u64(0x5eed_0000 + ty as u64);
    match ty {
        KeyType::Int2 | KeyType::Int4 | KeyType::Int8 => int_keys(ty, &mut rng),
        KeyType::Text | KeyType::Varchar => text_keys(&mut rng),
        KeyType::Uuid => uuid_keys(&mut rng),
    }
}

/// Creates `table` partitioned by hash on `k` into `PARTITIONS`
/// partitions named `{table}_p{remainder}`, and inserts the keys with
/// `id` = their index (through their text form).
async fn create_and_load(c: &Client, table: &str, ty: KeyType, keys: &[KeyValue]) {
    let ty_name = sql_type(ty);
    let mut ddl = format!(
        "drop table if exists {table}; \
         create table {table} (id int4 not null, k {ty_name} not null) partition by hash (k);"
    );
    for r in 0..PARTITIONS {
        ddl.push_str(&format!(
            "create table {table}_p{r} partition of {table} \
             for values with (modulus {PARTITIONS}, remainder {r});"
        ));
    }
    c.batch_execute(&ddl).await.expect("partitioned table");
    let texts: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    let inserted = c
        .execute(
            &format!(
                "insert into {table} (id, k) \
                 select (i - 1)::int4, v::{ty_name} from unnest($1::text[]) with ordinality u(v, i)"
            ),
            &[&texts],
        )
        .await
        .expect("insert keys");
    assert_eq!(inserted as usize, keys.len());
}

/// Loads the keys of `ty` and checks every row: its partition, its
/// bucket under `satisfies_hash_partition` and `bucket_sql`, and that the
/// text and binary forms Postgres gives for it parse to the same key.
fn check_placement(ty: KeyType) {
    let table = format!("hashtest_{}", sql_type(ty));
    let keys = keys(ty);
    runtime().block_on(async {
        let c = direct().await;
        create_and_load(&c, &table, ty, &keys).await;

        let ours =
            |m: u32| -> Vec<i32> { keys.iter().map(|k| bucket(PG, ty, k, m) as i32).collect() };
        let sql_buckets = [PARTITIONS, MODULI[0], MODULI[1]]
            .map(|m| bucket_sql(PG, ty, "t.k", m).expect("postgres has bucket_sql"));
        let int8_form = match ty {
            KeyType::Int2 | KeyType::Int4 | KeyType::Int8 => "int8send(t.k::int8)",
            _ => "null::bytea",
        };
        let query = format!(
            "select e.id, t.tableoid::regclass::text, t.k::text, {send}(t.k), {int8_form}, \
                    satisfies_hash_partition('{table}'::regclass, {m0}, e.b0, t.k), \
                    satisfies_hash_partition('{table}'::regclass, {m1}, e.b1, t.k), \
                    {s8}, {s0}, {s1} \
             from {table} t join unnest($1::int4[], $2::int4[], $3::int4[]) e(id, b0, b1) \
                  on t.id = e.id",
            send = send_function(ty),
            m0 = MODULI[0],
            m1 = MODULI[1],
            s8 = sql_buckets[0],
            s0 = sql_buckets[1],
            s1 = sql_buckets[2],
        );
        let ids: Vec<i32> = (0..keys.len() as i32).collect();
        let rows = c
            .query(&query, &[&ids, &ours(MODULI[0]), &ours(MODULI[1])])
            .await
            .expect("check query");
        assert_eq!(rows.len(), keys.len(), "every row joined");

        let mut failures = Vec::new();
        let mut per_partition = [0usize; PARTITIONS as usize];
        for row in &rows {
            let id: i32 = row.get(0);
            let key = &keys[id as usize];
            let mut fail = |what: String| failures.push(format!("{key:?}: {what}"));

            let partition: String = row.get(1);
            let b8 = bucket(PG, ty, key, PARTITIONS);
            per_partition[b8 as usize] += 1;
            if partition != format!("{table}_p{b8}") {
                fail(format!("in {partition}, bucket {b8}"));
            }
            for (i, m) in MODULI.iter().enumerate() {
                if !row.get::<_, bool>(5 + i) {
                    fail(format!("satisfies_hash_partition false for modulus {m}"));
                }
            }
            for (i, m) in [PARTITIONS, MODULI[0], MODULI[1]].iter().enumerate() {
                let in_pg: i64 = row.get(7 + i);
                if in_pg != i64::from(bucket(PG, ty, key, *m)) {
                    fail(format!("bucket_sql gives {in_pg} for modulus {m}"));
                }
            }

            let text: String = row.get(2);
            let binary: Vec<u8> = row.get(3);
            let from_text = ty.parse_text(&text);
            let from_binary = ty.parse_binary(&binary);
            if from_text.as_ref() != Ok(key) || from_binary.as_ref() != Ok(key) {
                fail(format!(
                    "text {text:?} -> {from_text:?}, binary -> {from_binary:?}"
                ));
            }
            if let Some(int8_bytes) = row.get::<_, Option<Vec<u8>>>(4) {
                if ty.parse_binary(&int8_bytes).as_ref() != Ok(key) {
                    fail("int8 binary form parses differently".into());
                }
            }
            if let (Ok(t), Ok(b)) = (&from_text, &from_binary) {
                if bucket(PG, ty, t, 1000) != bucket(PG, ty, b, 1000) {
                    fail("text and binary forms bucket differently".into());
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{} failed checks over {} {ty:?} keys; first ones:\n{}",
            failures.len(),
            keys.len(),
            failures[..failures.len().min(10)].join("\n")
        );
        assert!(
            per_partition.iter().all(|&n| n > 0),
            "every partition gets rows: {per_partition:?}"
        );
        c.batch_execute(&format!("drop table {table}"))
            .await
            .unwrap();
    });
}

#[test]
fn int2_placement_matches_postgres() {
    check_placement(KeyType::Int2);
}

#[test]
fn int4_placement_matches_postgres() {
    check_placement(KeyType::Int4);
}

#[test]
fn int8_placement_matches_postgres() {
    check_placement(KeyType::Int8);
}

#[test]
fn text_placement_matches_postgres() {
    check_placement(KeyType::Text);
}

#[test]
fn varchar_placement_matches_postgres() {
    check_placement(KeyType::Varchar);
}

#[test]
fn uuid_placement_matches_postgres() {
    check_placement(KeyType::Uuid);
}

/// Text inputs parse, fail and word their errors as Postgres's input
/// functions do (`$1::text::type`, which runs the same input function).
#[test]
fn text_parsing_matches_postgres() {
    let int_inputs = [
        "0",
        "42",
        " 42 ",
        "+42",
        "-0",
        "\t\n42\r\x0b\x0c",
        "00000000000000000000042",
        "",
        " ",
        "-",
        "+",
        "4 2",
        "42.",
        "1e3",
        "abc",
        "--1",
        "1x",
        "32767",
        "32768",
        "-32768",
        "-32769",
        "32768x",
        "99999x",
        "2147483647",
        "2147483648",
        "-2147483648",
        "-2147483649",
        "9223372036854775807",
        "9223372036854775808",
        "-9223372036854775808",
        "-9223372036854775809",
        "99999999999999999999999",
    ];
    // Postgres 16 syntax: accepted here whatever the server, since a newer
    // server takes it and an older one rejects the statement itself.
    let pg16_inputs = ["0x1F", "-0X_1f", "0o17", "0b101", "1_000", "-0x8000"];
    let uuid_inputs = [
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
        "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
        "a0eebc999c0b4ef8bb6d6bb9bd380a11",
        "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
        "{a0eebc99-9c0b4ef8-bb6d6bb9-bd380a11}",
        "",
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-",
        " a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "a0eebc9-99c0b-4ef8-bb6d-6bb9bd380a11",
        "a0eebc99--9c0b-4ef8-bb6d-6bb9bd380a11",
        "a0eebc999c0b4ef8bb6d6bb9bd380a1",
        "g0eebc999c0b4ef8bb6d6bb9bd380a11",
    ];
    runtime().block_on(async {
        let c = direct().await;
        let version: i32 = c
            .query_one("select current_setting('server_version_num')::int4", &[])
            .await
            .unwrap()
            .get(0);
        let mut cases: Vec<(KeyType, &str)> = Vec::new();
        for ty in [KeyType::Int2, KeyType::Int4, KeyType::Int8] {
            cases.extend(int_inputs.iter().map(|s| (ty, *s)));
            cases.extend(pg16_inputs.iter().map(|s| (ty, *s)));
        }
        cases.extend(uuid_inputs.iter().map(|s| (KeyType::Uuid, *s)));

        let mut failures = Vec::new();
        for (ty, input) in cases {
            let sql = format!("select ($1::text::{})::text", sql_type(ty));
            let theirs = c.query_one(&sql, &[&input]).await;
            let ours = ty.parse_text(input);
            let pg16_only = version < 160_000 && pg16_inputs.contains(&input);
            match (&ours, &theirs) {
                (Ok(v), Ok(row)) if v.to_string() == row.get::<_, String>(0) => {}
                (Ok(_), Err(e)) if pg16_only && common::code(e) == "22P02" => {}
                (Err(ours), Err(e))
                    if Some(ours.sqlstate()) == e.code().map(|c| c.code())
                        && e.as_db_error().map(|d| d.message().to_owned())
                            == Some(ours.to_string()) => {}
                _ => failures.push(format!(
                    "{ty:?} {input:?}: ours {ours:?}, Postgres {theirs:?}"
                )),
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    });
}

/// `bucket_sql` is accepted where a shard split needs it: a publication
/// row filter (immutable built-ins only) and a COPY (SELECT ...) filter.
#[test]
fn bucket_sql_is_accepted_as_row_filter() {
    runtime().block_on(async {
        let c = direct().await;
        let filter = bucket_sql(PG, KeyType::Int8, "k", 4).unwrap();
        c.batch_execute(&format!(
            "drop publication if exists hashtest_pub_b0; \
             drop table if exists hashtest_pub; \
             create table hashtest_pub (k int8 primary key, v text); \
             insert into hashtest_pub select g, 'v' from generate_series(-500, 500) g; \
             create publication hashtest_pub_b0 for table hashtest_pub where ({filter} = 0);"
        ))
        .await
        .expect("bucket_sql as a publication row filter");

        let copied = c
            .copy_out(&format!(
                "copy (select k from hashtest_pub where {filter} = 0) to stdout"
            ))
            .await
            .expect("bucket_sql in a COPY filter");
        let chunks: Vec<bytes::Bytes> = copied.try_collect().await.unwrap();
        let text = String::from_utf8(chunks.concat()).unwrap();
        let mut got: Vec<i64> = text.lines().map(|l| l.parse().unwrap()).collect();
        got.sort_unstable();
        let expected: Vec<i64> = (-500..=500)
            .filter(|&k| bucket(PG, KeyType::Int8, &KeyValue::Int(k), 4) == 0)
            .collect();
        assert!(!expected.is_empty());
        assert_eq!(got, expected);

        c.batch_execute("drop publication hashtest_pub_b0; drop table hashtest_pub")
            .await
            .unwrap();
    });
}
