// The Worker of the peer benchmark: `POST /publish` with {"messages": [<JSON body>, ...]}
// sends them with one `sendBatch` on the queue producer binding and answers {"sent",
// "acked"}; the queue consumer acks each message of each batch and counts them; `GET
// /stats` answers {"acked": n}.

let acked = 0;

export default {
  async fetch(request, env) {
    const { pathname } = new URL(request.url);
    if (request.method === "POST" && pathname === "/publish") {
      const { messages } = await request.json();
      await env.EVENTS.sendBatch(messages.map((body) => ({ body, contentType: "json" })));
      return Response.json({ sent: messages.length, acked });
    }
    if (pathname === "/stats") return Response.json({ acked });
    return new Response("not found", { status: 404 });
  },

  async queue(batch) {
    for (const message of batch.messages) message.ack();
    acked += batch.messages.length;
  },
};
