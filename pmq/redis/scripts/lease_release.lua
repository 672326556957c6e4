-- KEYS: the key; ARGV: value. Compare-and-delete: deletes the key if it holds the value (a
-- lease its owner lets go of, a cold flag of one sweep's mark); returns 1 if deleted.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
