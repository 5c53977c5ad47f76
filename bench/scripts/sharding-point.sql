\set id random(1, :nrows)
SELECT balance FROM bench_accounts WHERE id = :id;
