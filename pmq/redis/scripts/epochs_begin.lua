-- KEYS: mark; ARGV: token. The bucket is no longer complete; this recovery is under way.
redis.call('HDEL', KEYS[1], 'epoch')
redis.call('HSET', KEYS[1], 'recovering', ARGV[1])
return 1
