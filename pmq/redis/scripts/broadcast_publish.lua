-- KEYS: dedupe, group zset, index zset, bodies, queue, storage queue.
-- ARGV: dedupe_ttl (0: no dedupe), id, ms, message_json, queue_item, storage_op, retention seconds.
-- Returns {0, first id} or {1}.
if ARGV[1] ~= '0' then  -- 0: no dedupe key
    local previous = redis.call('GET', KEYS[1])
    if previous then return {0, previous} end
    redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[1]))
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
redis.call('HSET', KEYS[4], ARGV[2], ARGV[4])
for i = 2, 4 do redis.call('EXPIRE', KEYS[i], tonumber(ARGV[7])) end
redis.call('RPUSH', KEYS[5], ARGV[5])
redis.call('RPUSH', KEYS[6], ARGV[6])
return {1}
