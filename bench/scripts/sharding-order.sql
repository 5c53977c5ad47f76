SELECT id, balance FROM bench_accounts ORDER BY balance DESC, id LIMIT 10;
