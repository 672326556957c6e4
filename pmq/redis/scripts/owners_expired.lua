-- KEYS: owners; ARGV: limit. The owners whose lease has expired.
--! include _now
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, tonumber(ARGV[1]))
