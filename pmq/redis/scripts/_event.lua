-- Queues one event to the site (pmq.wire.events) from inside a script, so that the event
-- and the change it tells of are one step: queue_event(outbox, id, type, ts, data) pushes
-- {"id", "type", "ts", "data"} onto the `outbox` list. `id` is the caller's random id, `ts`
-- unix ms, `data` a table (cjson: an empty table would become {}, so never an empty list).
local function queue_event(outbox, id, kind, ts, data)
    redis.call('RPUSH', outbox, '{"id":"' .. id .. '","type":"' .. kind .. '","ts":' .. ts
        .. ',"data":' .. cjson.encode(data) .. '}')
end
