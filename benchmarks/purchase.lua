-- wrk script: POST a Nachocode purchase per request.
-- Arguments after "--": <key> <run prefix> <mode>, mode "unique" (every request a new
-- purchase: fresh orderId/transactionId/iapLogId from a per-thread counter) or
-- "duplicate" (the same purchase over and over).
-- Statuses of 400 and above count in "non_2xx"; done() prints one JSON line
-- (BENCH {...}) that benchmarks/run.py reads.

local thread_count = 0

function setup(thread)
   thread_count = thread_count + 1
   thread:set("thread_id", thread_count)
end

local template = '{"userId":"bench-user","iapLogId":%d,"nachoProductId":"NP-BENCH-0001",'
   .. '"os":"%s","productId":"com.nachocode.example.consumable","productType":"consumable",'
   .. '"quantity":1,"price":1000,"environment":"sandbox","data":%s,'
   .. '"requestedAt":"2025-02-19T02:00:31.280Z","purchasedAt":"2025-02-19T02:00:30.112Z",'
   .. '"verifiedAt":"2025-02-19T02:00:31.901Z"}'

local function body_for(n)
   local id = string.format("%s-%d-%d", prefix, thread_id, n)
   local log_id = (thread_id * 100000000) + n
   if n % 2 == 0 then
      return string.format(template, log_id, "android",
         string.format('{"purchaseToken":"token-%s.AO-J1O","orderId":"GPA.%s"}', id, id))
   end
   return string.format(template, log_id, "ios",
      string.format('{"originalTransactionId":"%s","transactionId":"%s"}', id, id))
end

function init(args)
   key = args[1]
   prefix = args[2]
   mode = args[3] or "unique"
   counter = 0
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
   wrk.headers["Authorization"] = "Bearer " .. key
   if mode == "duplicate" then
      fixed = wrk.format(nil, nil, nil, body_for(0))
   end
end

function request()
   if fixed then
      return fixed
   end
   counter = counter + 1
   return wrk.format(nil, nil, nil, body_for(counter))
end

function done(summary, latency, requests)
   local errors = summary.errors
   io.write(string.format(
      'BENCH {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"connect_errors":%d,'
      .. '"read_errors":%d,"write_errors":%d,"timeouts":%d,"non_2xx":%d}\n',
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
      errors.connect, errors.read, errors.write, errors.timeout, errors.status))
end
