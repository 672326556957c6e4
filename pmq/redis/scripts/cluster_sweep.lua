-- KEYS: the cluster view (pmq.redis.keys.cluster_workers); ARGV: now (unix ms), most age ms.
-- Deletes the entries older than the age, and unreadable ones, in one step: a worker that
-- reports while a survivor sweeps is never caught half-way. Returns how many went.
local now, max_age = tonumber(ARGV[1]), tonumber(ARGV[2])
local entries = redis.call('HGETALL', KEYS[1])
local removed = 0
for i = 1, #entries, 2 do
    local ok, entry = pcall(cjson.decode, entries[i + 1])
    local updated = ok and type(entry) == 'table' and tonumber(entry['updated'])
    if not updated or now - updated > max_age then
        redis.call('HDEL', KEYS[1], entries[i])
        removed = removed + 1
    end
end
return removed
