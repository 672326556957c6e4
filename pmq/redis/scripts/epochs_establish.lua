-- KEYS: mark; ARGV: token, epoch. Completes the recovery ``token`` unless Redis lost it.
if redis.call('HGET', KEYS[1], 'recovering') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'recovering')
redis.call('HSET', KEYS[1], 'epoch', ARGV[2])
return 1
