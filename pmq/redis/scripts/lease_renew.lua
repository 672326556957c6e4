-- KEYS: the lease; ARGV: owner, ttl ms. Renews the lease while the caller holds it; never
-- takes a lapsed one again (the holder must take it anew). Returns 1 if renewed, else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
