-- KEYS: owners; ARGV: owner, lease ms. Returns 1 when the owner was not registered (first
-- renewal, or its lease had lapsed and it was taken over), 0 when it renewed a live lease.
--! include _now
return redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
