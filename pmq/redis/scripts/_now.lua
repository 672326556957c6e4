-- The current time of Redis in unix ms, as `now`: every lease is on this one clock.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
