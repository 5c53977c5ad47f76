SELECT count(*) FROM bench_accounts;
