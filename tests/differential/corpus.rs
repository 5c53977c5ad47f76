//! The differential test's queries: hand-written ones for the cases known
//! to trip sharded merging, and ones generated from templates (tables ×
//! columns × aggregates × filters; sort keys × directions × NULLS × LIMIT/
//! OFFSET; grouping expressions × aggregates × HAVING).
//!
//! Every query is read-only. A query marked `ordered` has an ORDER BY that
//! fixes the order of every row (it ends with a unique column, or sorts
//! groups by their unique key); the others are compared as multisets, so a
//! LIMIT appears only under a total ORDER BY.

use super::data::{Dataset, HOT_CUSTOMERS, TENANTS};
use shardgate::sharding::hash::{KeyType, KeyValue};
use shardgate::sharding::map::ShardMap;

/// A Bind parameter.
#[derive(Debug, Clone)]
pub enum Param {
    Int8(i64),
    Int4(i32),
    Text(String),
}

#[derive(Debug, Clone)]
pub struct Case {
    pub category: &'static str,
    pub sql: String,
    /// The ORDER BY determines the order of every row: compare as lists.
    pub ordered: bool,
    /// With parameters the query runs in the extended protocol only.
    pub params: Vec<Param>,
    /// The query fails on one Postgres too (the proxy must fail alike or
    /// refuse it); any other query failing on the oracle is a corpus bug.
    pub fails: bool,
}

#[derive(Default)]
struct Corpus {
    cases: Vec<Case>,
}

impl Corpus {
    fn add(&mut self, category: &'static str, sql: impl Into<String>, ordered: bool) {
        self.cases.push(Case {
            category,
            sql: sql.into(),
            ordered,
            params: Vec::new(),
            fails: false,
        });
    }

    /// Unordered (multiset) comparison.
    fn set(&mut self, category: &'static str, sql: impl Into<String>) {
        self.add(category, sql, false);
    }

    /// Ordered comparison: the ORDER BY is total.
    fn list(&mut self, category: &'static str, sql: impl Into<String>) {
        self.add(category, sql, true);
    }

    fn with_params(
        &mut self,
        category: &'static str,
        sql: &str,
        params: Vec<Param>,
        ordered: bool,
    ) {
        self.cases.push(Case {
            category,
            sql: sql.into(),
            ordered,
            params,
            fails: false,
        });
    }

    fn failing(&mut self, category: &'static str, sql: impl Into<String>) {
        self.cases.push(Case {
            category,
            sql: sql.into(),
            ordered: false,
            params: Vec::new(),
            fails: true,
        });
    }
}

/// Keys chosen with the bucket map: lists on one shard (answerable by one
/// shard) and lists spanning shards.
struct Keys {
    /// Customer ids with rows, on 7's shard (7 first).
    same_shard: Vec<i64>,
    /// Customer ids with rows on at least two shards.
    cross_shard: Vec<i64>,
    /// Tenants on acme's shard (acme first).
    tenants_same: Vec<String>,
    /// Tenants on at least two shards.
    tenants_cross: Vec<String>,
    /// Device ids (canonical) on one shard, and on several.
    devices_same: Vec<String>,
    devices_cross: Vec<String>,
}

fn choose_keys(map: &ShardMap, data: &Dataset) -> Keys {
    let shard_of_int = |k: i64| map.locate(KeyType::Int8, &KeyValue::Int(k)).shard;
    let shard_of_text = |t: &str| map.locate(KeyType::Text, &KeyValue::Text(t.into())).shard;
    let shard_of_uuid = |u: &str| {
        map.locate(KeyType::Uuid, &KeyType::Uuid.parse_text(u).unwrap())
            .shard
    };

    let home = shard_of_int(7);
    let mut same_shard = vec![7];
    same_shard.extend(
        (1..200)
            .filter(|k| *k != 7 && k % 13 != 0 && shard_of_int(*k) == home)
            .take(3),
    );
    let other = (1..200)
        .find(|k| k % 13 != 0 && shard_of_int(*k) != home)
        .expect("a key on another shard");
    let cross_shard = vec![7, other, -3, 42];

    let acme = shard_of_text("acme");
    let mut tenants_same = vec!["acme".to_string()];
    tenants_same.extend(
        TENANTS[1..]
            .iter()
            .filter(|t| shard_of_text(t) == acme)
            .map(|t| t.to_string())
            .take(2),
    );
    let elsewhere = TENANTS
        .iter()
        .find(|t| shard_of_text(t) != acme)
        .expect("a tenant on another shard");
    let tenants_cross = vec!["acme".to_string(), elsewhere.to_string(), "zeta".into()];

    let ids = data.device_ids();
    let first = shard_of_uuid(&ids[0]);
    let devices_same: Vec<String> = ids
        .iter()
        .filter(|u| shard_of_uuid(u) == first)
        .take(3)
        .cloned()
        .collect();
    let mut devices_cross = vec![ids[0].clone()];
    devices_cross.extend(ids.iter().find(|u| shard_of_uuid(u) != first).cloned());
    devices_cross.push(ids[5].clone());
    Keys {
        same_shard,
        cross_shard,
        tenants_same,
        tenants_cross,
        devices_same,
        devices_cross,
    }
}

fn int_list(keys: &[i64]) -> String {
    keys.iter()
        .map(|k| k.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn text_list(keys: &[String]) -> String {
    keys.iter()
        .map(|k| super::data::quote(k))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn build(map: &ShardMap, data: &Dataset) -> Vec<Case> {
    let keys = choose_keys(map, data);
    let mut c = Corpus::default();
    point_lookups(&mut c, &keys, data);
    in_lists_and_ranges(&mut c, &keys);
    hand_written_orders(&mut c);
    aggregates(&mut c, &keys);
    groups_and_distinct(&mut c);
    joins(&mut c);
    traps(&mut c);
    generated_aggregates(&mut c, &keys);
    generated_orders(&mut c);
    generated_groups(&mut c);
    c.cases
}

fn point_lookups(c: &mut Corpus, keys: &Keys, data: &Dataset) {
    let cat = "point lookup";
    let mut customers: Vec<i64> = HOT_CUSTOMERS.to_vec();
    customers.extend([i64::MAX, i64::MIN, 1 << 40, 999_999, -120, 2000]);
    for k in &customers {
        c.set(cat, format!("select * from df_customers where id = {k}"));
        c.list(
            cat,
            format!("select * from df_orders where customer_id = {k} order by id"),
        );
    }
    for k in [7, -3, 2000] {
        c.set(
            cat,
            format!(
                "select count(*), count(note), sum(amount), avg(amount), min(placed), max(placed), sum(qty), avg(qty) \
                 from df_orders where customer_id = {k}"
            ),
        );
    }
    // The key written other ways.
    c.list(
        cat,
        "select id, amount from df_orders where customer_id = '7' order by id",
    );
    c.list(
        cat,
        "select id, amount from df_orders where 42 = customer_id order by id",
    );
    c.list(
        cat,
        "select id from df_orders where customer_id = -3::int8 order by id",
    );
    c.set(
        cat,
        "select * from df_customers where id = 7 and name is not null",
    );
    c.set(cat, "select * from df_orders where customer_id = null");
    c.set(
        cat,
        "select * from df_orders where customer_id = 7 and customer_id = 42",
    );
    for t in ["acme", "Acme", "émigré", "", "ärger", "nobody"] {
        c.list(
            cat,
            format!(
                "select * from df_events where tenant = {} order by seq",
                super::data::quote(t)
            ),
        );
    }
    let ids = data.device_ids();
    for (i, u) in ids.iter().take(3).enumerate() {
        c.set(cat, format!("select * from df_devices where id = '{u}'"));
        let other_spelling = if i == 0 {
            u.to_uppercase()
        } else {
            format!("{{{}}}", u.replace('-', ""))
        };
        c.set(
            cat,
            format!("select * from df_devices where id = '{other_spelling}'"),
        );
    }

    // The same through Bind parameters (extended protocol only).
    let cat = "point lookup $1";
    for k in customers.iter().take(8) {
        c.with_params(
            cat,
            "select * from df_orders where customer_id = $1 order by id",
            vec![Param::Int8(*k)],
            true,
        );
    }
    for k in [7, 42, -3] {
        c.with_params(
            cat,
            "select count(*), sum(amount), max(status) from df_orders where customer_id = $1 and qty > $2",
            vec![Param::Int8(k), Param::Int4(10)],
            false,
        );
        c.with_params(
            cat,
            "select name, country, created from df_customers where id = $1",
            vec![Param::Int8(k)],
            false,
        );
    }
    for t in ["acme", "émigré", "", "ACME"] {
        c.with_params(
            cat,
            "select * from df_events where tenant = $1 order by seq",
            vec![Param::Text(t.into())],
            true,
        );
    }
    c.with_params(
        cat,
        "select kind, count(*) from df_events where tenant = $1 and kind = $2 group by kind",
        vec![Param::Text("acme".into()), Param::Text("click".into())],
        false,
    );
    c.with_params(
        cat,
        "select o.id, c.name from df_orders o join df_customers c on c.id = o.customer_id where o.customer_id = $1 order by o.id",
        vec![Param::Int8(7)],
        true,
    );
    c.with_params(
        cat,
        "select count(*) from df_orders where customer_id = $1 or customer_id = $2",
        vec![
            Param::Int8(keys.same_shard[0]),
            Param::Int8(keys.same_shard[1]),
        ],
        false,
    );
    c.with_params(
        cat,
        "select count(*) from df_orders where customer_id = $1 or customer_id = $2",
        vec![
            Param::Int8(keys.cross_shard[0]),
            Param::Int8(keys.cross_shard[1]),
        ],
        false,
    );
    c.with_params(
        cat,
        "select count(*) from df_orders where customer_id > $1",
        vec![Param::Int8(500)],
        false,
    );
    // Parameters in queries across shards.
    let cat = "cross-shard $1";
    c.with_params(
        cat,
        "select count(*), sum(amount), avg(qty) from df_orders where qty > $1",
        vec![Param::Int4(50)],
        false,
    );
    c.with_params(
        cat,
        "select id, qty from df_orders where qty = $1 order by id",
        vec![Param::Int4(3)],
        true,
    );
    c.with_params(
        cat,
        "select id, amount from df_orders order by id limit $1 offset $2",
        vec![Param::Int8(5), Param::Int8(2995)],
        true,
    );
    c.with_params(
        cat,
        "select tenant, count(*) from df_events where kind = $1 group by tenant",
        vec![Param::Text("click".into())],
        false,
    );
    c.with_params(
        cat,
        "select * from df_customers where name = $1 order by id",
        vec![Param::Text("é".into())],
        true,
    );
}

fn in_lists_and_ranges(c: &mut Corpus, keys: &Keys) {
    let cat = "IN list";
    let same = int_list(&keys.same_shard);
    let cross = int_list(&keys.cross_shard);
    for list in [&same, &cross] {
        c.list(
            cat,
            format!("select * from df_orders where customer_id in ({list}) order by id"),
        );
        c.set(
            cat,
            format!("select count(*), sum(amount), min(note) from df_orders where customer_id in ({list})"),
        );
        c.list(
            cat,
            format!("select id, name from df_customers where id in ({list}) order by id"),
        );
    }
    c.set(
        cat,
        format!("select count(*) from df_orders where customer_id = any('{{{same}}}')"),
    );
    c.set(
        cat,
        format!("select count(*) from df_orders where customer_id = any(array[{cross}])"),
    );
    c.set(
        cat,
        format!("select count(*) from df_orders where customer_id not in ({same})"),
    );
    for list in [&keys.tenants_same, &keys.tenants_cross] {
        let l = text_list(list);
        c.list(
            cat,
            format!("select * from df_events where tenant in ({l}) order by seq"),
        );
        c.set(
            cat,
            format!("select tenant, count(*), sum(n) from df_events where tenant in ({l}) group by tenant"),
        );
    }
    for list in [&keys.devices_same, &keys.devices_cross] {
        let l = text_list(list);
        c.set(cat, format!("select * from df_devices where id in ({l})"));
    }

    let cat = "range scan";
    for sql in [
        "select * from df_orders where customer_id between 1 and 50 order by id",
        "select * from df_orders where customer_id < 0 order by id",
        "select id, amount from df_orders where amount > 40000 order by id",
        "select id, amount from df_orders where amount between -1 and 1 order by amount, id",
        "select id, placed from df_orders where placed >= '2023-01-01' and placed < '2023-02-01' order by placed, id",
        "select seq, tenant from df_events where tenant >= 'a' and tenant < 'b' order by seq",
        "select seq, tenant from df_events where tenant > 'Z' order by tenant, seq",
        "select id, created from df_customers where created between '2023-03-26 00:00+00' and '2023-03-26 03:00+00' order by created, id",
        "select seq, at from df_events where at >= '2023-10-29 02:00' and at < '2023-10-29 03:00' order by at, seq",
        "select id, score from df_customers where score > 49000 order by score desc, id",
        "select id, ratio from df_customers where ratio < -490 order by ratio, id",
        "select id, owner from df_devices where owner between 1 and 20 order by id",
        "select id from df_customers where id > 1099 order by id",
        "select id from df_customers where name like 'a%' order by id",
        "select id from df_customers where name ilike 'É%' order by id",
    ] {
        c.list(cat, sql);
    }
    c.set(
        cat,
        "select count(*) from df_orders where customer_id >= 7 and customer_id <= 7",
    );
}

fn hand_written_orders(c: &mut Corpus) {
    let cat = "order by";
    for sql in [
        "select id, name from df_customers order by name, id",
        "select id, name from df_customers order by name desc nulls last, id",
        "select id, name from df_customers order by name nulls first, id desc",
        "select id, name from df_customers order by lower(name), id",
        "select id, name from df_customers order by name collate \"C\", id",
        "select id, country from df_customers order by country nulls first, id",
        "select id, created from df_customers order by created desc, id",
        "select id, created from df_customers order by created at time zone 'America/New_York', id",
        "select id, score from df_customers order by score, id",
        "select id, score from df_customers order by score desc nulls first, id",
        "select id, ratio from df_customers order by ratio, id",
        "select id, vip from df_customers order by vip nulls first, id desc",
        "select customer_id, id, amount from df_orders order by amount * qty desc nulls last, id",
        "select customer_id, id, amount from df_orders order by 3, 2",
        "select id as k, score * 2 as s2 from df_customers order by s2 desc nulls last, k",
        "select id, status, placed from df_orders order by status, placed desc nulls first, id",
        "select tenant, seq from df_events order by tenant, seq",
        "select tenant, seq from df_events order by tenant desc, seq desc",
        "select id, label from df_devices order by label, id",
        "select id from df_devices order by id",
        "select id, name from df_customers order by name, id limit 10",
        "select id, name from df_customers order by name desc, id limit 10 offset 500",
        "select id, amount from df_orders order by id limit 10",
        "select * from df_orders order by id limit 5 offset 3",
        "select id, amount from df_orders order by id desc limit 10",
        "select id, amount from df_orders order by amount nulls first, id limit 20 offset 400",
        // More than the smallest shard has.
        "select id, amount from df_orders order by id offset 2500 limit 30",
        "select id, amount from df_orders order by id offset 5990",
        "select id, amount from df_orders order by id offset 100000",
        "select id, amount from df_orders order by id limit 0",
        "select id, amount from df_orders order by id limit all offset 5995",
        "select id, amount from df_orders order by id fetch first 5 rows only",
        "select id, amount from df_orders where customer_id = 7 order by amount desc nulls last, id limit 5 offset 100",
        "select id from df_customers order by id limit 5 offset 1135",
    ] {
        c.list(cat, sql);
    }
    // WITH TIES: the set is determined, the order among ties is not.
    c.set(
        cat,
        "select id, qty from df_orders order by qty desc nulls last fetch first 5 rows with ties",
    );
    c.set(cat, "select id, qty from df_orders limit 0");
    // An ICU collation orders text unlike C; if the server has no ICU,
    // both fail alike (42704).
    c.list(
        cat,
        "select id, name from df_customers order by name collate \"und-x-icu\", id",
    );
    c.list(
        cat,
        "select seq, tenant from df_events order by tenant collate \"und-x-icu\" desc, seq limit 40",
    );
}

fn aggregates(c: &mut Corpus, keys: &Keys) {
    let cat = "aggregate";
    let same = int_list(&keys.same_shard);
    for filter in [
        String::new(),
        "where customer_id = 7".to_string(),
        format!("where customer_id in ({same})"),
    ] {
        for agg in [
            "count(*), count(amount), count(distinct amount), sum(amount), avg(amount), min(amount), max(amount)",
            "sum(qty), avg(qty), min(qty), max(qty), count(distinct qty)",
            "min(status), max(status), count(distinct status)",
            "min(placed), max(placed)",
            "stddev(amount), variance(qty), stddev_pop(qty)",
            "bool_and(qty > 0), bool_or(qty > 90), every(amount is not null)",
            "string_agg(status, ',' order by status, id)",
            "array_agg(id order by id)",
            "percentile_cont(0.5) within group (order by amount), mode() within group (order by qty)",
            "count(*) filter (where note is null), sum(amount) filter (where status = 'paid')",
            "sum(amount * qty), max(amount) - min(amount)",
            "json_agg(id order by id)",
        ] {
            c.set(cat, format!("select {agg} from df_orders {filter}"));
        }
    }
    for sql in [
        "select count(*), count(vip), bool_and(vip), bool_or(vip) from df_customers",
        "select sum(ratio), avg(ratio), min(ratio), max(ratio), stddev(ratio) from df_customers",
        "select sum(score), avg(score), min(score), max(score) from df_customers",
        "select min(created), max(created), count(distinct created) from df_customers",
        "select sum(id), avg(id), min(id), max(id) from df_customers",
        "select min(name), max(name), count(distinct name), count(distinct lower(name)) from df_customers",
        "select sum(n), avg(n), min(n), max(n), count(distinct n) from df_events",
        "select min(tenant), max(tenant), count(distinct tenant) from df_events",
        "select min(at), max(at) from df_events",
        "select count(distinct id), min(owner), max(owner), count(distinct owner), sum(owner) from df_devices",
        "select min(label), max(label) from df_devices",
        "select count(*) from df_countries",
        "select count(*) from (select 1 from df_orders where qty > 50) s",
        // Nothing matches: count 0, every other aggregate NULL.
        "select count(*), count(amount), sum(amount), avg(qty), min(status), max(placed) from df_orders where qty > 1000",
        "select count(*), sum(n) from df_events where false",
        "select status, count(*) from df_orders where qty > 1000 group by status",
        // Expressions over aggregates.
        "select count(*) + 1, sum(qty) / count(*), avg(qty)::int, round(avg(amount), 2) from df_orders",
        "select max(amount) - min(amount), sum(qty) filter (where qty > 0) * 2 from df_orders",
        "select coalesce(max(note), 'none'), count(*) - count(note) from df_orders",
        "select status, sum(qty) * 100 / nullif(count(*), 0) from df_orders group by status",
    ] {
        c.set(cat, sql);
    }
}

fn groups_and_distinct(c: &mut Corpus) {
    let cat = "group by";
    for sql in [
        "select status, count(*), sum(amount) from df_orders group by status",
        "select status, count(*) from df_orders group by 1 order by 1 nulls first",
        "select customer_id, count(*), sum(amount) from df_orders group by customer_id",
        "select customer_id, count(*) from df_orders group by customer_id order by count(*) desc, customer_id limit 5",
        "select customer_id, sum(qty) from df_orders group by customer_id order by 2 desc nulls last, 1 limit 10 offset 3",
        "select date_trunc('month', placed) m, count(*), avg(amount) from df_orders group by m",
        "select qty % 3, count(*) from df_orders group by qty % 3",
        "select lower(status), count(*) from df_orders group by lower(status)",
        "select extract(year from placed) y, sum(qty) from df_orders group by 1",
        "select coalesce(note, '-') n, count(*) from df_orders group by 1",
        "select status, count(*) from df_orders group by status having count(*) > 700",
        "select status, avg(qty) from df_orders group by status having sum(amount) > 0",
        "select customer_id from df_orders group by customer_id having count(*) > 100",
        "select customer_id, max(amount) from df_orders group by customer_id having count(distinct status) = 8",
        "select status, qty > 50 as big, count(*) from df_orders group by rollup (status, qty > 50)",
        "select status, count(*) from df_orders where customer_id = 7 group by status",
        "select country, count(*), avg(score) from df_customers group by country",
        "select vip, count(*), sum(ratio) from df_customers group by vip",
        "select date_trunc('day', created) d, count(*) from df_customers group by d",
        "select tenant, count(*), sum(n) from df_events group by tenant",
        "select lower(tenant), count(*) from df_events group by lower(tenant)",
        "select kind, count(*), min(at) from df_events group by kind having count(*) > 400",
        "select label, count(*) from df_devices group by label",
    ] {
        let ordered = sql.contains("order by");
        c.add(cat, sql, ordered);
    }

    let cat = "distinct";
    for sql in [
        "select distinct status from df_orders",
        "select distinct customer_id from df_orders",
        "select distinct qty, status from df_orders",
        "select distinct name from df_customers",
        "select distinct lower(name) from df_customers",
        "select distinct tenant from df_events",
        "select distinct kind, n from df_events where n between 0 and 5",
        "select distinct label from df_devices",
    ] {
        c.set(cat, sql);
    }
    for sql in [
        "select distinct country from df_customers order by 1 nulls first",
        "select distinct on (customer_id) customer_id, id, amount from df_orders order by customer_id, id",
        "select distinct on (status) status, id from df_orders order by status, amount desc nulls last, id",
        "select distinct name from df_customers order by name limit 5",
        "select distinct tenant from df_events order by tenant desc limit 3 offset 1",
    ] {
        c.list(cat, sql);
    }
}

fn joins(c: &mut Corpus) {
    let cat = "reference join";
    for sql in [
        "select c.id, co.name from df_customers c join df_countries co on co.code = c.country where c.id = 7",
        "select co.region, count(*) from df_customers c join df_countries co on co.code = c.country group by co.region",
        "select c.id, co.region from df_customers c left join df_countries co on co.code = c.country where c.id in (1, 2, 3, 4, 5)",
        // The reference table on the outer side: every shard has its own
        // unmatched countries.
        "select co.code, c.id from df_countries co left join df_customers c on c.country = co.code",
        "select co.code, count(c.id) from df_countries co left join df_customers c on c.country = co.code group by co.code",
        "select co.code, count(*) from df_countries co left join df_customers c on c.country = co.code group by co.code",
        "select count(*) from df_countries co left join df_customers c on c.country = co.code",
        "select c.id, co.code from df_customers c right join df_countries co on co.code = c.country",
        "select c.id, co.code from df_customers c full join df_countries co on co.code = c.country",
        "select co.code from df_countries co where not exists (select 1 from df_customers c where c.country = co.code)",
        "select co.name, o.id from df_orders o join df_customers c on c.id = o.customer_id join df_countries co on co.code = c.country where o.customer_id = 42",
        "select count(*) from df_customers where country in (select code from df_countries where region = 'Europe')",
        "select count(*) from df_customers c where not exists (select 1 from df_countries co where co.code = c.country)",
        "select * from df_countries",
        "select region, count(*) from df_countries group by region",
    ] {
        c.set(cat, sql);
    }
    c.list(
        cat,
        "select c.id, co.name from df_customers c join df_countries co on co.code = c.country order by co.name, c.id limit 25",
    );
    c.list(
        cat,
        "select code, name from df_countries order by name, code",
    );

    let cat = "sharded join";
    for sql in [
        "select o.id, c.name from df_orders o join df_customers c on c.id = o.customer_id where o.customer_id = 7",
        "select o.id, c.name from df_orders o join df_customers c on c.id = o.customer_id where c.id = -3",
        "select c.country, count(*) from df_orders o join df_customers c on c.id = o.customer_id group by c.country",
        "select count(*) from df_orders o left join df_customers c on c.id = o.customer_id where c.id is null",
        "select count(*) from df_customers c where exists (select 1 from df_orders o where o.customer_id = c.id)",
        "select count(*) from df_customers c where not exists (select 1 from df_orders o where o.customer_id = c.id)",
        // Not on the sharding key: rows meet across shards.
        "select count(*) from df_devices d join df_customers c on c.id = d.owner",
        "select c.id, d.label from df_devices d join df_customers c on c.id = d.owner where c.id = 7",
        "select count(*) from df_orders o join df_events e on e.kind = o.status",
        "select count(*) from df_orders a join df_orders b on a.qty = b.qty where a.customer_id = 7",
        "select count(*) from df_customers c where exists (select 1 from df_devices d where d.owner = c.id)",
        "select count(*) from df_orders o join df_customers c on c.name = o.note",
    ] {
        c.set(cat, sql);
    }
}

fn traps(c: &mut Corpus) {
    let cat = "union/subquery";
    for sql in [
        "select customer_id from df_orders where customer_id = 7 union all select id from df_customers where id = 7",
        "select status from df_orders union all select kind from df_events",
        "select country from df_customers union select code from df_countries",
        "select customer_id from df_orders where qty = 3 except select id from df_customers",
        "select id from df_customers where id = 7 intersect select customer_id from df_orders where customer_id = 7",
        "select id, (select count(*) from df_orders o where o.customer_id = c.id) from df_customers c where c.id = 7",
        "select id, (select count(*) from df_orders o where o.customer_id = c.id) from df_customers c where c.id < 0",
        "select count(*) from df_orders where amount > (select avg(amount) from df_orders)",
        "select (select max(id) from df_customers), (select count(*) from df_events)",
        "select count(*) from df_orders where customer_id in (select id from df_customers where vip)",
        "select count(*) from df_orders where customer_id = 7 and qty > (select avg(qty) from df_orders where customer_id = 7)",
        "with t as (select customer_id, sum(amount) s from df_orders group by customer_id) select count(*), max(s) from t",
        "with t as (select * from df_orders where customer_id = 42) select count(*), sum(qty) from t",
        "select count(*) from (select distinct status, qty from df_orders) s",
        "select avg(c) from (select count(*) c from df_orders group by customer_id) s",
    ] {
        c.set(cat, sql);
    }

    let cat = "window";
    for sql in [
        "select id, row_number() over (order by id) from df_customers order by id limit 20",
        "select customer_id, id, sum(amount) over (partition by customer_id order by id) from df_orders where customer_id = 7 order by id",
        "select customer_id, id, rank() over (partition by customer_id order by amount desc nulls last, id) from df_orders order by customer_id, id",
        "select status, id, count(*) over (partition by status) from df_orders order by id limit 50",
        "select id, lag(id) over (order by id), lead(amount) over (order by id) from df_orders order by id limit 30 offset 2000",
        "select tenant, seq, dense_rank() over (order by tenant) from df_events order by seq",
        "select id, score, ntile(4) over (order by score nulls first, id) from df_customers order by id",
        "select id, sum(ratio) over () from df_customers order by id limit 3",
    ] {
        c.list(cat, sql);
    }

    let cat = "error";
    c.failing(cat, "select 1 / 0 from df_orders where customer_id = 7");
    c.failing(cat, "select id / (qty - qty) from df_orders");
    c.failing(cat, "select id::int2 from df_customers");
    c.failing(cat, "select 'x'::int from df_orders where customer_id = 42");
    c.failing(cat, "select no_such_column from df_orders");
}

/// One query per (column, aggregate) over every shard; then, per column,
/// all its aggregates for one key and for a same-shard IN list.
fn generated_aggregates(c: &mut Corpus, keys: &Keys) {
    let cat = "generated aggregate";
    const NUMERIC: [&str; 6] = [
        "count({c})",
        "count(distinct {c})",
        "sum({c})",
        "min({c})",
        "max({c})",
        "avg({c})",
    ];
    const ORDERED: [&str; 4] = ["count({c})", "count(distinct {c})", "min({c})", "max({c})"];
    // (table, key column, column, numeric?)
    let columns = [
        ("df_orders", "customer_id", "amount", true),
        ("df_orders", "customer_id", "qty", true),
        ("df_orders", "customer_id", "id", true),
        ("df_orders", "customer_id", "placed", false),
        ("df_orders", "customer_id", "status", false),
        ("df_orders", "customer_id", "note", false),
        ("df_customers", "id", "score", true),
        ("df_customers", "id", "ratio", true),
        ("df_customers", "id", "id", true),
        ("df_customers", "id", "name", false),
        ("df_customers", "id", "created", false),
        ("df_events", "tenant", "n", true),
        ("df_events", "tenant", "at", false),
        ("df_events", "tenant", "kind", false),
        ("df_events", "tenant", "tenant", false),
        ("df_devices", "id", "owner", true),
        ("df_devices", "id", "label", false),
    ];
    let one_key = |table: &str| match table {
        "df_events" => "'acme'".to_string(),
        "df_devices" => format!("'{}'", keys.devices_same[0]),
        _ => "7".to_string(),
    };
    let same_list = |table: &str| match table {
        "df_events" => text_list(&keys.tenants_same),
        "df_devices" => text_list(&keys.devices_same),
        _ => int_list(&keys.same_shard),
    };
    for (table, key, col, numeric) in columns {
        let aggs: &[&str] = if numeric { &NUMERIC } else { &ORDERED };
        for a in aggs {
            let agg = a.replace("{c}", col);
            c.set(cat, format!("select {agg} from {table}"));
        }
        let all: Vec<String> = aggs.iter().map(|a| a.replace("{c}", col)).collect();
        let all = all.join(", ");
        c.set(
            cat,
            format!("select {all} from {table} where {key} = {}", one_key(table)),
        );
        c.set(
            cat,
            format!(
                "select {all} from {table} where {key} in ({})",
                same_list(table)
            ),
        );
    }
    for table in ["df_orders", "df_customers", "df_events", "df_devices"] {
        c.set(cat, format!("select count(*) from {table}"));
    }
}

/// Sort keys × directions × NULLS placement × LIMIT/OFFSET, always with
/// the table's unique column last.
fn generated_orders(c: &mut Corpus) {
    let cat = "generated order by";
    // (table, unique column, sort expressions, rows)
    let tables: [(&str, &str, &[&str]); 4] = [
        (
            "df_orders",
            "id",
            &[
                "amount",
                "qty",
                "status",
                "placed",
                "note",
                "amount * qty",
                "customer_id",
            ],
        ),
        (
            "df_customers",
            "id",
            &[
                "name",
                "country",
                "created",
                "score",
                "ratio",
                "vip",
                "lower(name)",
            ],
        ),
        ("df_events", "seq", &["tenant", "kind", "n", "at"]),
        ("df_devices", "id", &["label", "owner"]),
    ];
    let nulls = ["", " nulls first", " nulls last"];
    let windows = [
        "",
        " limit 10",
        " limit 7 offset 900",
        " offset 1000",
        " limit 25 offset 40",
        " limit 0",
        " limit 3 offset 2700",
    ];
    let mut n = 0usize;
    for (table, unique, exprs) in tables {
        for expr in exprs {
            for dir in ["", " desc"] {
                let null = nulls[n % nulls.len()];
                let window = windows[n % windows.len()];
                // Three spellings of the same sort: the expression, its
                // ordinal position, its alias.
                let sql = match n % 3 {
                    0 => format!(
                        "select {unique}, {expr} from {table} order by {expr}{dir}{null}, {unique}{window}"
                    ),
                    1 => format!(
                        "select {unique}, {expr} from {table} order by 2{dir}{null}, 1{window}"
                    ),
                    _ => format!(
                        "select {unique} as u, {expr} as sortkey from {table} order by sortkey{dir}{null}, u{window}"
                    ),
                };
                c.list(cat, sql);
                n += 1;
            }
        }
    }
    // The same on one shard.
    for expr in ["amount", "status", "placed", "amount * qty"] {
        c.list(
            cat,
            format!("select id, {expr} from df_orders where customer_id = 7 order by {expr} desc nulls first, id limit 15 offset 10"),
        );
    }
    for expr in ["kind", "n", "at"] {
        c.list(
            cat,
            format!("select seq, {expr} from df_events where tenant = 'acme' order by {expr} nulls first, seq"),
        );
    }
}

/// Grouping expressions × aggregates × HAVING.
fn generated_groups(c: &mut Corpus) {
    let cat = "generated group by";
    // (table, grouping expression, aggregated column)
    let groups = [
        ("df_orders", "status", "amount"),
        ("df_orders", "qty % 4", "amount"),
        ("df_orders", "date_trunc('month', placed)", "qty"),
        ("df_orders", "extract(isodow from placed)", "amount"),
        ("df_orders", "note is null", "qty"),
        ("df_orders", "customer_id", "amount"),
        ("df_orders", "upper(status)", "id"),
        ("df_customers", "country", "score"),
        ("df_customers", "vip", "ratio"),
        ("df_customers", "date_trunc('day', created)", "score"),
        ("df_customers", "length(name)", "id"),
        ("df_customers", "score > 0", "ratio"),
        ("df_events", "kind", "n"),
        ("df_events", "tenant", "n"),
        ("df_events", "lower(tenant)", "n"),
        ("df_events", "n / 10", "seq"),
        ("df_events", "date_trunc('hour', at)", "n"),
        ("df_devices", "label", "owner"),
        ("df_devices", "owner is null", "owner"),
    ];
    let aggs = [
        "count(*)",
        "sum({c})",
        "avg({c})",
        "min({c})",
        "max({c})",
        "count(distinct {c})",
    ];
    let havings = [
        "",
        " having count(*) > 3",
        " having count(distinct {c}) > 1",
        " having sum({c}) > 0",
    ];
    for (i, (table, g, col)) in groups.iter().enumerate() {
        let agg = aggs[i % aggs.len()].replace("{c}", col);
        let agg2 = aggs[(i + 1) % aggs.len()].replace("{c}", col);
        let having = havings[i % havings.len()].replace("{c}", col);
        c.set(
            cat,
            format!("select {g} as g, {agg}, {agg2} from {table} group by 1{having}"),
        );
        // Groups sorted by their (unique) key.
        c.list(
            cat,
            format!("select {g} as g, {agg} from {table} group by {g} order by g desc nulls first"),
        );
    }
}
