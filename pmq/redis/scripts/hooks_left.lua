-- KEYS: the bucket's hook_online, hook_leaving, then the user_conns of each user (users of
-- that bucket). ARGV: the unix ms the user.offline falls due, then the uid of each
-- KEYS[i + 2]. Each user the site was told is online whose connections are all gone gets a
-- user.offline due, unless one is due already. Returns how many it scheduled.
local scheduled = 0
for i = 3, #KEYS do
    local uid = ARGV[i - 1]
    if redis.call('EXISTS', KEYS[i]) == 0 and redis.call('HEXISTS', KEYS[1], uid) == 1
        and not redis.call('ZSCORE', KEYS[2], uid) then
        redis.call('ZADD', KEYS[2], ARGV[1], uid)
        scheduled = scheduled + 1
    end
end
return scheduled
