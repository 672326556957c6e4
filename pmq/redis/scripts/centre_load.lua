-- KEYS: the user's reads hash, read ids. ARGV: ttl seconds, '1' when the user's bucket is
-- known complete in Redis (then the state is marked loaded), the number of marks n, then n
-- kind/mark pairs, then id/ms pairs of the items read one by one (as storage holds them).
-- Merges storage's read state into Redis: marks only rise, ids are added. Returns 1.
local function above(a, b)
    return #a > #b or (#a == #b and a > b)
end
local n = tonumber(ARGV[3])
for i = 4, 3 + 2 * n, 2 do
    local current = redis.call('HGET', KEYS[1], ARGV[i])
    if not current or above(ARGV[i + 1], current) then
        redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    end
end
for i = 4 + 2 * n, #ARGV, 2 do
    redis.call('ZADD', KEYS[2], ARGV[i + 1], ARGV[i])
end
if ARGV[2] == '1' then redis.call('HSET', KEYS[1], 'loaded', '1') end
for i = 1, 2 do redis.call('EXPIRE', KEYS[i], tonumber(ARGV[1])) end
return 1
