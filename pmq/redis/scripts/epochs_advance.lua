-- KEYS: mark; ARGV: epoch, gen of the highest mark the caller knows storage holds. Moves gen
-- up; a mark below the known one means Redis went back in time: the epoch goes (the bucket
-- is no longer complete) and gen is lifted past the known one. Returns {gen, epoch or 0}.
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
local gen = tonumber(redis.call('HGET', KEYS[1], 'gen') or '0')
local known_epoch, known_gen = tonumber(ARGV[1]), tonumber(ARGV[2])
if epoch > 0 and (epoch < known_epoch or (epoch == known_epoch and gen < known_gen)) then
    redis.call('HDEL', KEYS[1], 'epoch')
    redis.call('HSET', KEYS[1], 'gen', known_gen)
    epoch = 0
end
return {redis.call('HINCRBY', KEYS[1], 'gen', 1), epoch}
