-- MurmurHash3 x64_128 (seed 0), first 64-bit half, as the proxy computes it
-- (src/sharding/hash.rs, HashFunction::Murmur3), for moving buckets of
-- tables sharded with hash = "murmur3": copy filters, checksums, fence and
-- watch triggers, and the apply filter on the receiving side all compute a
-- row's bucket in Postgres with these. Unsigned 64-bit values are numeric
-- in [0, 2^64); xor goes through bigint. Installed by shardgate in schema
-- shardgate on the source and the target of a move.
CREATE SCHEMA IF NOT EXISTS shardgate;
-- The fence and watch triggers' WHEN clauses call these functions as the
-- application's login: it needs to reach them (the schema's tables stay
-- private).
GRANT USAGE ON SCHEMA shardgate TO PUBLIC;

CREATE OR REPLACE FUNCTION shardgate.u64_xor(a numeric, b numeric) RETURNS numeric
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $f$
  SELECT CASE WHEN r < 0 THEN r + 18446744073709551616 ELSE r END
  FROM (SELECT ((CASE WHEN a >= 9223372036854775808 THEN a - 18446744073709551616 ELSE a END)::bigint
              # (CASE WHEN b >= 9223372036854775808 THEN b - 18446744073709551616 ELSE b END)::bigint)::numeric AS r) x
$f$;

CREATE OR REPLACE FUNCTION shardgate.u64_rotl(x numeric, r int) RETURNS numeric
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $f$
  SELECT (x * (1::bigint << r)::numeric) % 18446744073709551616 + div(x, (1::bigint << (64 - r))::numeric)
$f$;

CREATE OR REPLACE FUNCTION shardgate.u64_fmix(k numeric) RETURNS numeric
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $f$
BEGIN
  k := shardgate.u64_xor(k, div(k, 8589934592));
  k := (k * 18397679294719823053) % 18446744073709551616;
  k := shardgate.u64_xor(k, div(k, 8589934592));
  k := (k * 14181476777654086739) % 18446744073709551616;
  RETURN shardgate.u64_xor(k, div(k, 8589934592));
END
$f$;

-- The finalization: h1 of the state (h1, h2) after `len` bytes.
CREATE OR REPLACE FUNCTION shardgate.murmur3_final(h1 numeric, h2 numeric, len int) RETURNS numeric
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $f$
DECLARE
  m CONSTANT numeric := 18446744073709551616;
BEGIN
  h1 := shardgate.u64_xor(h1, len);
  h2 := shardgate.u64_xor(h2, len);
  h1 := (h1 + h2) % m;
  h2 := (h2 + h1) % m;
  h1 := shardgate.u64_fmix(h1);
  h2 := shardgate.u64_fmix(h2);
  RETURN (h1 + h2) % m;
END
$f$;

-- h1 of the bytes `data`.
CREATE OR REPLACE FUNCTION shardgate.murmur3_h1(data bytea) RETURNS numeric
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $f$
DECLARE
  m CONSTANT numeric := 18446744073709551616;
  c1 CONSTANT numeric := 9782798678568883157;
  c2 CONSTANT numeric := 5545529020109919103;
  len CONSTANT int := length(data);
  nblocks CONSTANT int := len / 16;
  tail CONSTANT int := len % 16;
  h1 numeric := 0;
  h2 numeric := 0;
  k1 numeric;
  k2 numeric;
BEGIN
  FOR i IN 0 .. nblocks - 1 LOOP
    k1 := 0;
    k2 := 0;
    FOR j IN 0 .. 7 LOOP
      k1 := k1 + get_byte(data, i * 16 + j)::numeric * (1::bigint << (8 * j))::numeric;
      k2 := k2 + get_byte(data, i * 16 + 8 + j)::numeric * (1::bigint << (8 * j))::numeric;
    END LOOP;
    k1 := (shardgate.u64_rotl((k1 * c1) % m, 31) * c2) % m;
    h1 := shardgate.u64_xor(h1, k1);
    h1 := (shardgate.u64_rotl(h1, 27) + h2) % m;
    h1 := (h1 * 5 + 1390208809) % m;
    k2 := (shardgate.u64_rotl((k2 * c2) % m, 33) * c1) % m;
    h2 := shardgate.u64_xor(h2, k2);
    h2 := (shardgate.u64_rotl(h2, 31) + h1) % m;
    h2 := (h2 * 5 + 944331445) % m;
  END LOOP;
  k1 := 0;
  k2 := 0;
  IF tail > 8 THEN
    FOR j IN 8 .. tail - 1 LOOP
      k2 := k2 + get_byte(data, nblocks * 16 + j)::numeric * (1::bigint << (8 * (j - 8)))::numeric;
    END LOOP;
    k2 := (shardgate.u64_rotl((k2 * c2) % m, 33) * c1) % m;
    h2 := shardgate.u64_xor(h2, k2);
  END IF;
  IF tail > 0 THEN
    FOR j IN 0 .. least(tail, 8) - 1 LOOP
      k1 := k1 + get_byte(data, nblocks * 16 + j)::numeric * (1::bigint << (8 * j))::numeric;
    END LOOP;
    k1 := (shardgate.u64_rotl((k1 * c1) % m, 31) * c2) % m;
    h1 := shardgate.u64_xor(h1, k1);
  END IF;
  RETURN shardgate.murmur3_final(h1, h2, len);
END
$f$;

-- An integer key: its i64 in little-endian order (8 bytes), which read
-- back as a little-endian u64 is the value itself (mod 2^64): the 8-byte
-- tail case of murmur3_h1, without the byte loop.
CREATE OR REPLACE FUNCTION shardgate.murmur3_h1_int(k bigint) RETURNS numeric
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $f$
DECLARE
  m CONSTANT numeric := 18446744073709551616;
  k1 numeric := CASE WHEN k < 0 THEN k::numeric + m ELSE k::numeric END;
BEGIN
  k1 := (shardgate.u64_rotl((k1 * 9782798678568883157) % m, 31) * 5545529020109919103) % m;
  RETURN shardgate.murmur3_final(k1, 0, 8);
END
$f$;
