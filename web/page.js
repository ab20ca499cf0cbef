() => {
  // Escape stops a streaming reply, as in other chat apps (Stop is enabled only while one streams).
  document.addEventListener("keydown", (event) => {
    // Not an Escape that closes a dropdown or a list: only one meant for the reply.
    if (event.key !== "Escape" || event.defaultPrevented) return;
    if (event.target.closest && event.target.closest("[role=combobox], [role=listbox]")) return;
    const stop = document.querySelector("#stop");
    if (stop && !stop.disabled) stop.click();
  });

  // page.css sizes the chat column from where it starts (the banner wraps on narrow screens) and
  // from the height of the message rows pinned to a phone's screen.
  const root = document.documentElement.style;
  // Gradio's container hides what overflows it, which also keeps the chat column from sticking
  // while the settings beside it scroll; clipping does the one without the other.
  const container = document.querySelector(".gradio-container");
  if (container) container.style.overflow = "clip";
  const place = () => {
    const column = document.querySelector("#chat-column");
    const input = document.querySelector("#input-row");
    if (column) {
      const top = column.getBoundingClientRect().top + window.scrollY;
      root.setProperty("--chat-top", `${Math.round(top)}px`);
    }
    if (!input) return;
    const height = Math.round(input.offsetHeight);
    root.setProperty("--input-height", `${height}px`);
    // Where the rows are pinned (page.css), the page ends below them and what scrolls into view
    // stops above them. Gradio scopes the page's CSS to its container, so these are set here.
    const below = getComputedStyle(input).position === "fixed" ? `${height + 8}px` : "";
    root.scrollPaddingBottom = below;
    document.body.style.paddingBottom = below;
  };
  new ResizeObserver(place).observe(document.body);
  window.addEventListener("resize", place);
  place();

  // A new message (a question, its answer, or why there is none) comes into view, once; a
  // streaming answer growing does not move the page.
  const chat = document.querySelector("#chatbot");
  let bubbles = 0;
  if (chat) {
    new MutationObserver(() => {
      const count = chat.querySelectorAll("[data-testid=user], [data-testid=bot]").length;
      if (count > bubbles) chat.scrollIntoView({ block: "nearest" });
      bubbles = count;
    }).observe(chat, { childList: true, subtree: true });
  }

  // The message box takes the focus without scrolling the page; not on touch screens, where it
  // would open the keyboard over the chat.
  const box = document.querySelector("#message textarea");
  if (box && window.matchMedia("(pointer: fine)").matches) box.focus({ preventScroll: true });
}
